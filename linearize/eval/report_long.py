"""The "Long context" section of the report: Markdown tables and PNG curves from `report["long_context"]`.

Scores are shown as value ± standard error (over documents or trials); recoveries and perplexity ratios with
their 95% interval; a student-teacher gap inside 1.96 paired standard errors is marked "(within noise)".
"""

from __future__ import annotations

from pathlib import Path

PPL_METHOD = (
    "Perplexity against context length: each document contributes its first {tokens} tokens at every length L, "
    "cut into {tokens}/L non-overlapping windows of L tokens, each scored in full after a leading "
    "end-of-sequence token; every token is scored once at every L, so only the context it sees changes. "
    "Intervals are 95% over documents (token-weighted); ratios pair the two models on the same tokens."
)
QA_METHOD = (
    "Generated answers (greedy, through the model's cache, cut at the task's stop sequences), scored as "
    "lm-evaluation-harness scores them (SQuAD: exact match and F1 after SQuAD normalisation; DROP: its bag-of-spans "
    "EM/F1; CoQA: leave-one-annotator-out F1; contains: a gold answer appears in the output); scores in [0, 1]. "
    "'native' is OLMES's own prompt (SQuAD and DROP 5-shot, CoQA 0-shot); a haystack is a prompt of about the "
    "given length: the task description and OLMES's first example (SQuAD, DROP), passages of other questions of "
    "the same task, and the gold passage after round(depth x k) of the k distractors (0 = first, 1 = last; the "
    "mean measured depth is in report.json), then the question. Recovery is F1 / teacher F1."
)


def _num(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pm(x, se, digits=3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{x:.{digits}f}"


def _ci(x, lo, hi, pct=True, noise=None) -> str:
    if x is None:
        return "-"
    scale, unit = (100, "%") if pct else (1, "")
    text = f"{scale * x:.1f}{unit}" if pct else f"{x:.3f}"
    if lo is not None and hi is not None:
        text += f" [{scale * lo:.1f}, {scale * hi:.1f}]" if pct else f" [{lo:.3f}, {hi:.3f}]"
    if noise:
        text += " (within noise)"
    return text


def _mb(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def markdown(section: dict) -> list[str]:
    if not section:
        return []
    lines = ["## Long context", ""]
    cache = section.get("cache") or []
    if cache:
        lengths = list(cache[0]["at"])
        head = [f"cache at {n} tokens" for n in lengths]
        has_teacher = any("fraction_of_teacher" in r for r in cache)
        head += [f"of teacher at {n}" for n in lengths] if has_teacher else []
        lines += [
            "Cache kept between decoding steps (batch of one; MiB = 2^20 bytes): softmax key/value tensors, "
            "converted layers' linear state and sliding window, measured from each model's own cache.",
            "",
            "| model | layers | " + " | ".join(head) + f" | linear state / window / key-value at {lengths[0]} |",
            "|---|---|" + "---|" * (len(head) + 1),
        ]
        for r in cache:
            cells = [_mb(r["at"][n]["total"]) for n in lengths]
            if has_teacher:
                cells += [f"{100 * r.get('fraction_of_teacher', {}).get(n, float('nan')):.1f}%" for n in lengths]
            split = r["at"][lengths[0]]
            cells.append(f"{_mb(split['state'])} / {_mb(split['window'])} / {_mb(split['kv'])}")
            lines.append(f"| {r['model']} | {r['layers']} | " + " | ".join(cells) + " |")
        lines.append("")
    if section.get("branches"):
        lines += ["| control | what it removes |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in section["branches"].items()]
        lines.append("")
    ppl = section.get("perplexity")
    if ppl and ppl.get("rows"):
        lengths = ppl["lengths"]
        tokens = max(lengths)
        lines += [PPL_METHOD.format(tokens=tokens), ""]
        for src in ppl["sources"]:
            name = Path(src["source"]).name or src["source"]
            rows = [r for r in ppl["rows"] if r["source"] == src["source"]]
            lines += [
                f"Perplexity on `{name}`: {src['docs']} documents ({src['skipped_short']} skipped as shorter than "
                f"{tokens} tokens).",
                "",
                "| model | " + " | ".join(f"ppl @ {n}" for n in lengths) + " |",
                "|---|" + "---|" * len(lengths),
            ]
            for who in section["subjects"]:
                by_len = {r["length"]: r for r in rows if r["model"] == who}
                cells = []
                for n in lengths:
                    r = by_len.get(n)
                    cell = _num(r["ppl"], 2) if r else "-"
                    if r and r.get("ppl_lo") is not None:
                        cell += f" [{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}]"
                    if r and r.get("ratio") is not None:
                        inside = r["ratio_lo"] is not None and r["ratio_lo"] <= 1.0 <= r["ratio_hi"]
                        cell += f"; x{_ci(r['ratio'], r['ratio_lo'], r['ratio_hi'], pct=False, noise=inside)}"
                    cells.append(cell)
                lines.append(f"| {who} | " + " | ".join(cells) + " |")
            lines += ["", "Cells: perplexity [95% interval]; x ratio to the teacher [95% interval].", ""]
    qa = section.get("qa") or []
    native = [r for r in qa if r["length"] is None]
    if native:
        lines += [
            QA_METHOD,
            "",
            "| task | model | n | EM | F1 | contains | F1 recovery [95% CI] |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in native:
            lines.append(
                f"| {r['task']} | {r['model']} | {r['n']} | {_pm(r['em'], r['em_se'])} | {_pm(r['f1'], r['f1_se'])} "
                f"| {_pm(r['contains'], r['contains_se'])} | {_recovery(r)} |"
            )
        lines.append("")
    hay = [r for r in qa if r["length"] is not None]
    if hay:
        lines += [
            "F1 ± standard error in haystacks of about the given length (mean prompt tokens in brackets), gold "
            "passage at the given depth; [F1 recovery, 95% CI]. EM and contains are in report.json.",
            "",
        ]
        lines += _pivot(hay, ("task", "length", "depth"), section["subjects"], lambda r: _pm(r["f1"], r["f1_se"]))
    needles = section.get("needles") or []
    if needles:
        lines += [
            "Needle probes (passkey; RULER-style S-NIAH, MK-NIAH with 3 distractor needles, MV-NIAH with 4 values "
            "all required), greedy through the model's cache; accuracy ± standard error over trials "
            "[recovery, 95% CI].",
            "",
        ]
        lines += _pivot(needles, ("probe", "length"), section["subjects"], lambda r: _pm(r["accuracy"], r["se"], 2))
    if section.get("seconds"):
        spent = ", ".join(f"{k} {v:.0f} s" for k, v in section["seconds"].items())
        lines += [f"Wall time of the section over all {len(section['subjects'])} models: {spent}.", ""]
    return lines


def _recovery(r: dict) -> str:
    return _ci(r.get("recovery"), r.get("recovery_lo"), r.get("recovery_hi"), noise=r.get("within_noise"))


def _pivot(rows: list[dict], keys: tuple[str, ...], models: list[str], cell) -> list[str]:
    """One line per setting (`keys`), one column per model: the cell, then the recovery where there is one."""
    settings = list(dict.fromkeys(tuple(r[k] for k in keys) for r in rows))
    lines = ["| " + " | ".join([*keys, "n", *models]) + " |", "|---|" + "---|" * (len(keys) + len(models))]
    for setting in settings:
        mine = {r["model"]: r for r in rows if tuple(r[k] for k in keys) == setting}
        first = mine[models[0]] if models[0] in mine else next(iter(mine.values()))
        shown = [f"{v} ({_num(first.get('tokens'), 0)})" if k == "length" and "tokens" in first else str(v)
                 for k, v in zip(keys, setting, strict=True)]  # fmt: skip
        cells = []
        for who in models:
            r = mine.get(who)
            if r is None:
                cells.append("-")
                continue
            text = cell(r)
            if r.get("recovery") is not None:
                text += f" [{_recovery(r)}]"
            cells.append(text)
        n = first["n"]
        lines.append("| " + " | ".join([*shown, str(n), *cells]) + " |")
    return [*lines, ""]


def plots(section: dict, folder: Path, plt) -> list[str]:
    """long_ppl.png, long_qa.png and needles.png where the section has their data."""
    written = []
    # One colour per model in every plot, so a model keeps its colour where the teacher is not drawn.
    color = {who: f"C{i}" for i, who in enumerate(section.get("subjects", []))}
    ppl = section.get("perplexity") or {}
    if ppl.get("rows"):
        sources = ppl["sources"]
        fig, axes = plt.subplots(len(sources), 2, figsize=(10, 3.5 * len(sources)), squeeze=False)
        for (ax_p, ax_r), src in zip(axes, sources, strict=True):
            rows = [r for r in ppl["rows"] if r["source"] == src["source"]]
            for who in section["subjects"]:
                mine = sorted((r for r in rows if r["model"] == who), key=lambda r: r["length"])
                x = [r["length"] for r in mine]
                ys = [r["ppl"] for r in mine]
                err = _err(ys, [r.get("ppl_lo") for r in mine], [r.get("ppl_hi") for r in mine])
                ax_p.errorbar(x, ys, yerr=err, marker="o", capsize=3, label=who, color=color[who])
                if any(r.get("ratio") is not None for r in mine):
                    yr = [r["ratio"] for r in mine]
                    ax_r.errorbar(x, yr, yerr=_err(yr, [r["ratio_lo"] for r in mine], [r["ratio_hi"] for r in mine]),
                                  marker="o", capsize=3, label=who, color=color[who])  # fmt: skip
            ax_r.axhline(1.0, color="grey", lw=0.8, ls="--")
            for ax, title in ((ax_p, "perplexity"), (ax_r, "perplexity / teacher's")):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("context length (tokens)")
                ax.set_title(f"{title}: {Path(src['source']).name or src['source']}")
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "long_ppl.png", dpi=110)
        plt.close(fig)
        written.append("long_ppl.png")
    qa = [r for r in section.get("qa") or [] if r["length"] is not None and r["f1"] is not None]
    if qa:
        tasks = sorted({r["task"] for r in qa})
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for who in section["subjects"]:
                # F1 averaged over depths at each length, with the standard error of that average.
                by_len: dict[int, list[dict]] = {}
                for r in qa:
                    if r["task"] == task and r["model"] == who:
                        by_len.setdefault(r["length"], []).append(r)
                x = sorted(by_len)
                y = [sum(r["f1"] for r in by_len[n]) / len(by_len[n]) for n in x]
                se = [(sum((r["f1_se"] or 0) ** 2 for r in by_len[n]) ** 0.5) / len(by_len[n]) for n in x]
                ax.errorbar(x, y, yerr=se, marker="o", capsize=3, label=who, color=color[who])
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("F1 (mean over depths) ± se")
            ax.set_title(task)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "long_qa.png", dpi=110)
        plt.close(fig)
        written.append("long_qa.png")
    needles = section.get("needles") or []
    if needles:
        probes = list(dict.fromkeys(r["probe"] for r in needles))
        fig, axes = plt.subplots(1, len(probes), figsize=(4 * len(probes), 3.5), squeeze=False)
        for ax, probe in zip(axes[0], probes, strict=True):
            for who in section["subjects"]:
                mine = [r for r in needles if r["probe"] == probe and r["model"] == who]
                ax.errorbar([r["length"] for r in mine], [r["accuracy"] for r in mine],
                            yerr=[r["se"] or 0 for r in mine], marker="o", capsize=3, label=who,
                            color=color[who])  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("accuracy ± se")
            ax.set_title(probe)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "needles.png", dpi=110)
        plt.close(fig)
        written.append("needles.png")
    return written


def _err(values, lows, highs):
    if any(v is None for v in (*lows, *highs)):
        return None
    return [[v - lo for v, lo in zip(values, lows, strict=True)], [hi - v for v, hi in zip(values, highs, strict=True)]]
