"""The accuracy-recovery report: one JSON for scripts, Markdown for people, PNG plots for eyes.

Recovery is student / teacher; recovery above chance is (student - chance) / (teacher - chance), as RADLADS
reports it, so a task where both sit near chance does not flatter the student.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import report_long

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def recovery(student: float, teacher: float | None, chance: float) -> tuple[float | None, float | None]:
    if teacher is None or teacher == 0:
        return None, None
    # Above chance is only meaningful when the teacher itself beats chance.
    above = (student - chance) / (teacher - chance) if teacher > chance else None
    return student / teacher, above


def averages(rows: list[dict], zero_shot_names: set[str]) -> dict:
    """Mean teacher/student score and recovery over the zero-shot tasks and over all tasks."""
    out = {}
    for label, keep in (("zero_shot", lambda r: r["task"] in zero_shot_names), ("all", lambda r: True)):
        chosen = [r for r in rows if keep(r) and r.get("teacher") is not None]
        if not chosen:
            continue
        teacher = sum(r["teacher"] for r in chosen) / len(chosen)
        student = sum(r["student"] for r in chosen) / len(chosen)
        chance = sum(r["chance"] for r in chosen) / len(chosen)
        rec, above = recovery(student, teacher, chance)
        out[label] = {
            "tasks": [r["task"] for r in chosen],
            "teacher": teacher,
            "student": student,
            "recovery": rec,
            "recovery_above_chance": above,
        }
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pm(x, se, digits=3) -> str:
    """Value ± standard error (just the value where the error is unknown)."""
    if x is None:
        return "-"
    return f"{x:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{x:.{digits}f}"


def _pct_ci(x, lo, hi, noise=None) -> str:
    text = _pct(x)
    if x is not None and lo is not None and hi is not None:
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return text + (" (within noise)" if noise else "")


# What the per-layer transfer error compares, by the objective of the stage that measured it (reports written
# before the objective was recorded came from attention_output).
_COMPARED = {"attention_output": "the per-head attention outputs", "hidden_state": "the attention outputs after o_proj"}


def render_markdown(report: dict) -> str:
    lines = [f"# Accuracy recovery: {report['model']}", ""]
    lines.append(
        f"Teacher: {report.get('teacher') or '(none)'}; device: {report.get('device', '?')}; "
        f"created {report.get('created', '?')}; document limit per task: {report.get('limit') or 'all'}"
        + "".join(f", {k}: {v}" for k, v in (report.get("task_limits") or {}).items())
        + " (MMLU: per subject)."
    )
    sparse = report.get("sparse_cache")
    if sparse:
        lines.append("")
        lines.append(
            f"Sparse cache set for this evaluation: {sparse['pairs']} past key/value pairs per kv head kept exact "
            f"beside the window, updated every {sparse.get('block') or 'window'} tokens, in "
            f"{', '.join(sparse.get('models') or [])}."
        )
    lines.append("")
    if report.get("tasks"):
        lines += [
            "| task | metric | n | teacher | student | recovery | recovery above chance |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["tasks"]:
            rec = _pct_ci(r.get("recovery"), r.get("recovery_lo"), r.get("recovery_hi"), r.get("within_noise"))
            above = _pct_ci(
                r.get("recovery_above_chance"), r.get("recovery_above_chance_lo"), r.get("recovery_above_chance_hi")
            )
            lines.append(
                f"| {r['task']} | {r['metric']} | {r['n']} | {_pm(r.get('teacher'), r.get('teacher_se'))} | "
                f"{_pm(r['student'], r.get('student_se'))} | {rec} | {above} |"
            )
        for label, avg in report.get("averages", {}).items():
            lines.append(
                f"| **average ({label.replace('_', '-')})** | | | {_num(avg['teacher'])} | "
                f"{_num(avg['student'])} | {_pct(avg['recovery'])} | {_pct(avg['recovery_above_chance'])} |"
            )
        notes = [f"- {r['task']}: {r['notes']}" for r in report["tasks"] if r.get("notes")]
        lines += [
            "",
            "Scores: mean ± standard error over documents; recoveries with a 95% paired-bootstrap interval over "
            "documents; (within noise): the student-teacher gap is inside 1.96 paired standard errors.",
            *notes,
        ]
        lines.append("")
    if report.get("controls"):
        names = [r["task"] for r in report.get("tasks", [])]
        ppl_sources = [r["source"] for r in report.get("perplexity", [])]
        recall_keys = sorted(
            {k for c in report["controls"] for k in c.get("recall", {})},
            key=lambda k: (k.split("@")[0], int(k.split("@")[-1])),
        )
        student_ppl = {r["source"]: r["student"] for r in report.get("perplexity", [])}
        student_recall = {
            f"{r['probe']}@{r['length']}": r["student"] for r in report.get("recall", []) if "length" in r
        }
        ppl_cols = [f"ppl {Path(src).name}" for src in ppl_sources]
        lines += [
            "## Controls and other models",
            "",
            "| model | " + " | ".join([*names, "zero-shot average", *ppl_cols, *recall_keys]) + " |",
            "|---|" + "---|" * (len(names) + 1 + len(ppl_cols) + len(recall_keys)),
        ]

        def row(name, tasks, zs, ppl, recall):
            cells = [_num(tasks.get(n)) for n in names] + [_num(zs)]
            cells += [_num(ppl.get(src), 2) for src in ppl_sources]
            cells += [_num(recall.get(k), 2) for k in recall_keys]
            return f"| {name} | " + " | ".join(cells) + " |"

        lines.append(
            row(
                "student",
                {r["task"]: r["student"] for r in report.get("tasks", [])},
                report.get("averages", {}).get("zero_shot", {}).get("student"),
                student_ppl,
                student_recall,
            )
        )
        for c in report["controls"]:
            lines.append(
                row(c["name"], c["tasks"], c.get("zero_shot_avg"), c.get("perplexity", {}), c.get("recall", {}))
            )
        lines.append("")
    if report.get("perplexity"):
        lines += [
            "## Perplexity",
            "",
            "| text | tokens | teacher ppl | student ppl | ratio | teacher bpb | student bpb |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["perplexity"]:
            lines.append(
                f"| {r['source']} | {r['tokens']} | {_num(r.get('teacher'), 2)} | {_num(r['student'], 2)} | "
                f"{_num(r.get('ratio'), 3)} | {_num(r.get('teacher_bpb'))} | {_num(r['student_bpb'])} |"
            )
        lines.append("")
    if report.get("recall"):
        lines += ["## Recall probes", "", "| probe | size | teacher | student |", "|---|---|---|---|"]
        for r in report["recall"]:
            size = f"{r['length']} tokens" if "length" in r else f"{r['pairs']} pairs"
            lines.append(
                f"| {r['probe']} | {size} | {_pm(r.get('teacher'), r.get('teacher_se'), 2)} | "
                f"{_pm(r['student'], r.get('student_se'), 2)} |"
            )
        lines.append("")
    eff = report.get("efficiency") or {}
    if eff.get("student"):
        lines += [
            "## Speed and memory",
            "",
            "| model | context | prefill tok/s | decode ms/token | cache MB | peak MB |",
            "|---|---|---|---|---|---|",
        ]
        for who in ("teacher", "student"):
            for r in eff.get(who, []):
                lines.append(
                    f"| {who} | {r['length']} | {r['prefill_tokens_per_s']:,.0f} | "
                    f"{r['decode_ms_per_token']:.2f} | {r['cache_mb']:.2f} | "
                    f"{_num(r.get('peak_memory_mb'), 0)} |"
                )
        lines.append("")
    lines += report_long.markdown(report.get("long_context") or {})
    mse = report.get("transfer_layer_mse")
    if mse:
        worst = sorted(mse.items(), key=lambda kv: -kv[1])[:5]
        lines += [
            "## Attention transfer",
            "",
            f"Per-layer validation MSE of {_COMPARED.get(report.get('transfer_objective', 'attention_output'), 'the attention outputs')}: mean "
            f"{sum(mse.values()) / len(mse):.3g}; "
            "largest in layers " + ", ".join(f"{k} ({v:.3g})" for k, v in worst) + ".",
            "",
        ]
        if len(mse) > 3:
            keep = ",".join(sorted((k for k, _ in worst[:3]), key=int))
            # lolcats has a recipe made for this (stage-2 distillation); other recipes keep their own stages.
            recipe = report.get("recipe") or "lolcats"
            recipe = "lolcats-hybrid" if recipe == "lolcats" else recipe
            lines += [
                "A hybrid that keeps the three worst as softmax attention: "
                f"`--recipe {recipe} --set 'attention.softmax_layers=[{keep}]'` (see docs/RESULTS.md).",
                "",
            ]
    for name, caption in (
        ("tasks.png", "Scores"),
        ("efficiency.png", "Speed and memory"),
        ("recall.png", "Recall"),
        ("long_ppl.png", "Perplexity against context length"),
        ("long_qa.png", "Generated answers against prompt length"),
        ("needles.png", "Needle probes"),
        ("transfer.png", "Attention transfer error"),
    ):
        if name in report.get("plots", []):
            lines.append(f"![{caption}]({name})")
    return "\n".join(lines).rstrip() + "\n"


def render_plots(report: dict, folder: Path) -> list[str]:
    """Write the PNG plots the report has data for; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = report.get("tasks") or []
    if tasks:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks)), 3.5))
        series = [("teacher", [r.get("teacher") or 0 for r in tasks]), ("student", [r["student"] for r in tasks])]
        series += [(c["name"], [c["tasks"].get(r["task"], 0) for r in tasks]) for c in report.get("controls", [])]
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            ax.bar([x + i * width for x in range(len(tasks))], values, width, label=label)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], [r["task"] for r in tasks], rotation=20)
        ax.set_ylabel("score")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "tasks.png", dpi=110)
        plt.close(fig)
        written.append("tasks.png")
    eff = report.get("efficiency") or {}
    if eff.get("student"):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for who in ("teacher", "student"):
            rows = eff.get(who) or []
            if not rows:
                continue
            lengths = [r["length"] for r in rows]
            axes[0].plot(lengths, [r["prefill_tokens_per_s"] for r in rows], marker="o", label=who)
            axes[1].plot(lengths, [r["decode_ms_per_token"] for r in rows], marker="o", label=who)
            axes[2].plot(lengths, [r["cache_mb"] for r in rows], marker="o", label=who)
        for ax, title in zip(axes, ("prefill tokens/s", "decode ms/token", "cache MB"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length")
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "efficiency.png", dpi=110)
        plt.close(fig)
        written.append("efficiency.png")
    recall_rows = report.get("recall") or []
    if recall_rows:
        units = {"passkey": ("length", "context tokens"), "mqar": ("pairs", "key-value pairs")}
        # One panel per probe that ran, each with its own x axis.
        run = [p for p in units if any(r["probe"] == p for r in recall_rows)]
        fig, axes = plt.subplots(1, len(run), figsize=(5 * len(run), 3.5), squeeze=False)
        for ax, probe in zip(axes[0], run, strict=True):
            key = units[probe][0]
            rows = [r for r in recall_rows if r["probe"] == probe]
            for who in ("teacher", "student"):
                if rows[0].get(who) is not None:
                    ax.errorbar([r[key] for r in rows], [r[who] for r in rows],
                                yerr=[r.get(f"{who}_se") or 0 for r in rows], marker="o", capsize=3,
                                label=who)  # fmt: skip
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel("accuracy ± se")
            ax.set_xlabel(units[probe][1])
            ax.set_title(probe)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "recall.png", dpi=110)
        plt.close(fig)
        written.append("recall.png")
    written += report_long.plots(report.get("long_context") or {}, folder, plt)
    mse = report.get("transfer_layer_mse")
    if mse:
        fig, ax = plt.subplots(figsize=(6, 3))
        layers = sorted(mse, key=int)
        ax.bar([int(k) for k in layers], [mse[k] for k in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("transfer MSE")
        fig.tight_layout()
        fig.savefig(folder / "transfer.png", dpi=110)
        plt.close(fig)
        written.append("transfer.png")
    return written


def write_report(report: dict, folder: str | Path) -> Path:
    """Write report.json, the plots and report.md into `folder`; returns the Markdown path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    report["plots"] = render_plots(report, folder)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2))
    path = folder / REPORT_MD
    path.write_text(render_markdown(report))
    return path


def load_report(folder: str | Path) -> dict:
    from ..errors import LinearizeError

    path = Path(folder) / REPORT_JSON
    if not path.is_file():
        raise LinearizeError(f"{path} does not exist: run `linearize eval ... --out {folder}` first")
    return json.loads(path.read_text())
