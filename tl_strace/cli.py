"""The ``tl-strace`` command. It uses the public API only.

    tl-strace trace "It is a truth universally acknowledged, that a single man"
    tl-strace trace --model ./my_model_dir --sizes 1e-3 1e-2 0.1 --json "some text"
    tl-strace profile "The capital of France is Paris." --html profile.html --out runs/paris

Subcommands register themselves in :data:`COMMANDS` (name → (add_arguments, run)), so each lives
next to the code it drives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# Nothing heavy at import: ``tl-strace --help`` must not wait for torch (seconds). The bundled names
# come from the light registry; the options' choices from the registries (one list of names each,
# never a second copy here), read when a subcommand's arguments are added, i.e. only for the
# subcommand being run (see build_parser).
from tl_strace.io.registry import list_bundled_models

#: The bundled model names, read from the registry (never a second list here).
_BUNDLED = ", ".join(list_bundled_models())


def _choices(name: str) -> list[str]:
    """One registry's names: ``conditions``, ``attention``, ``ablations``, ``granularities``, ``methods``, ``weights``,
    ``sets`` (imported on first use: these modules import torch)."""
    if name == "conditions":
        from tl_strace.ablation import CONDITIONS as names
    elif name == "attention":
        from tl_strace.ablation import ATTENTION_MODES as names
    elif name == "ablations":
        from tl_strace.components import ABLATIONS as names
    elif name == "granularities":
        from tl_strace.corpus import GRANULARITIES as names
    elif name == "methods":
        from tl_strace.search import STRATIFICATIONS as names
    elif name == "weights":
        from tl_strace.weights import WEIGHTS as names
    elif name == "sets":
        from tl_strace.io.datasets import SHIPPED_SETS as names
    else:  # pragma: no cover - a typo here
        raise KeyError(name)
    return list(names)

__all__ = ["COMMANDS", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of the command:
    ``tl-strace: error: <message> (see tl-strace <command> --help)`` on stderr, exit status 2
    (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        msg = " ".join(str(message).split())
        self.exit(2, f"tl-strace: error: {msg} (see {self.prog} --help)\n")


def _text_arg(kind: str) -> Callable[[str], str]:
    """An argparse type refusing an empty value (``--save ''`` would otherwise be falsy, so ignored;
    ``--out ''`` would be the current directory): ``argument --save: the value is empty; give a file path``."""
    def check(text: str) -> str:
        if text == "":
            raise argparse.ArgumentTypeError(f"the value is empty; give a {kind}")
        return text

    return check


_PATH = _text_arg("path")
_FILE = _text_arg("file path")
_NAME = _text_arg("model name or directory")


def _bytes(text: str) -> int:
    """``2GiB`` / ``512MiB`` / ``1.5GB`` / ``2.5G`` / a plain number of bytes → bytes (argparse type).

    The same parser as the API's ``memory_budget`` (:func:`tl_strace.options.parse_bytes`), so the
    command and the library accept the same units.
    """
    from tl_strace.errors import InputError
    from tl_strace.options import parse_bytes

    try:
        return parse_bytes(text, name="--memory-budget")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fmt_s(s: float) -> str:
    return f"{s:g}"


def format_trace(res: Any, *, show_tokens: Sequence[float] = (1e-3, 1e-2, 0.1, 0.4, 1.0)) -> str:
    """A plain-text report of one result: header, density, the per-size table, top tokens."""
    cfg, model = res.config, res.model
    lines = [
        f"model {model['name']} · {len(res.str_tokens)} tokens · {res.n_total:,} {res.UNIT} · "
        f"method {cfg['method']} ({cfg['weights']} weights, {cfg['ablation']} ablation)",
        f"full model: next token {res.full_top_strs[0]!r} (p = {float(res.full_top_probs[0]):.3f}), "
        f"entropy {res.full_entropy:.3f} nats",
        f"density (area under TV over log10 s): {res.density:.4f}    linear-s area: {res.density_linear:.4f}",
    ]
    if res.attention != "faithful":
        from tl_strace.ablation import attention_label

        lines.insert(1, f"attention: {res.attention} — {attention_label(res.attention)}; not a faithful measurement")
    rec = res.recovery_sizes()
    lines.append("shared-nucleus recovery size: " + ", ".join(
        f"{k}%: {'-' if math.isnan(v) else _fmt_s(v)}" for k, v in rec.items()))
    conds = list(res.conditions)
    head = f"{'size':>8} {'edges':>9} " + " ".join(f"{'TV ' + c:>11}" for c in conds) + f" {'nucleus':>8}  top token (only)"
    lines += ["", head, "-" * len(head)]
    for k in range(len(res.sizes)):
        tvs = " ".join(f"{float(res.tv_all[c, k]):>11.4f}" for c in range(len(conds)))
        lines.append(f"{_fmt_s(float(res.sizes[k])):>8} {int(res.counts[k]):>9,} {tvs} "
                     f"{float(res.nucleus_all[0, k]):>8.0f}  {res.top_strs[0][k][0]!r}")
    lines += ["", "top tokens of the trace:"]
    sizes = [float(x) for x in res.sizes]
    for s in show_tokens:
        k = min(range(len(sizes)), key=lambda i: abs(math.log10(sizes[i]) - math.log10(s)))
        toks = ", ".join(f"{t!r} {float(p):.3f}" for t, p in zip(res.top_strs[0][k], res.top_probs[0, k]))
        lines.append(f"  s = {_fmt_s(sizes[k]):>6}: {toks}")
    toks = ", ".join(f"{t!r} {float(p):.3f}" for t, p in zip(res.full_top_strs, res.full_top_probs))
    lines.append(f"  full    : {toks}")
    return "\n".join(lines)


def _add_text_model_search(p: argparse.ArgumentParser, text_help: str) -> None:
    """The arguments every tracing command shares: the text, the model, the search."""
    p.add_argument("text", help=text_help)
    p.add_argument("--model", default="smollm2-135m", type=_NAME,
                   help=f"bundled model ({_BUNDLED}; offline), local directory, or hub name (default: smollm2-135m)")
    p.add_argument("--method", default="strace", choices=_choices("methods"))
    p.add_argument("--weights", default="l1", choices=_choices("weights"))
    p.add_argument("--sizes", type=float, nargs="+", help="s-Trace target sizes in (0, 1] (default: paper B's 26)")
    p.add_argument("--taus", type=float, nargs="+", help="thresholds for --method threshold/nucleus")


def _add_trace(p: argparse.ArgumentParser) -> None:
    _add_text_model_search(p, "the input text; the token after its last token is the prediction traced")
    p.add_argument("--conditions", nargs="+", default=_choices("conditions"), choices=_choices("conditions"))
    p.add_argument("--target", help="the true next token (text), for cross-entropy and rank")
    _add_attention(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--batch-size", type=int, help="masks per forward pass (default: from the memory budget)")
    p.add_argument("--memory-budget", type=_bytes, metavar="SIZE",
                   help="the most memory one trace may use, e.g. 2GiB or 512MiB (see tl_strace.memory)")
    p.add_argument("--save", metavar="PATH", type=_FILE, help="also save the result (.safetensors, loadable with StraceResult.load)")
    p.add_argument("--json", action="store_true", help="print the result table as JSON instead of text")
    p.add_argument("--html", metavar="PATH", type=_FILE, help="also write a standalone HTML report (curves, interactive "
                   "circuit, circuitsvis details; works offline)")


def _run_trace(args: argparse.Namespace) -> int:
    from tl_strace.errors import InputError
    from tl_strace.fsutil import check_output_path
    from tl_strace.options import check_target
    from tl_strace.options import TraceOptions

    # Before the model is loaded (seconds): the options by the rules strace applies (sizes, taus
    # against the method, batch size, ...), the text and target, then the output paths (a missing or
    # read-only directory, a directory, a device node).
    if not args.text.strip():
        raise InputError("The input text is empty (or only whitespace); give at least one word to predict from.")
    if args.target is not None:
        if args.target == "":
            raise InputError("--target is empty; give the true next token as text (e.g. --target ' Paris') "
                             "or leave it out.")
        check_target(args.target)
    TraceOptions(method=args.method, weights=args.weights, conditions=args.conditions, sizes=args.sizes,
                 taus=args.taus, seed=args.seed, batch_size=args.batch_size, memory_budget=args.memory_budget,
                 attention=args.attention)
    if args.save:
        check_output_path(args.save, what="--save file")
    if args.html:
        check_output_path(args.html, what="--html file")
    import tl_strace as ts

    model = ts.load_model(args.model)
    res = ts.strace(model, args.text, sizes=args.sizes, method=args.method, taus=args.taus, weights=args.weights,
                    conditions=args.conditions, target=args.target, seed=args.seed, batch_size=args.batch_size,
                    memory_budget=args.memory_budget, attention=args.attention)
    written = []
    if args.save:
        res.save(args.save)
        written.append(f"result saved to {args.save}")
    if args.html:
        written.append(f"HTML report written to {res.save_html(args.html, model=model)}")
    _emit(args.json, lambda: json.dumps({"summary": res.summary(), "strata": res.to_dataframe().to_dict(orient="records")},
                                        default=float, indent=1), lambda: format_trace(res), written)
    return 0


def _emit(as_json: bool, document: Callable[[], str], text: Callable[[], str], written: list[str]) -> None:
    """Print a command's output: one JSON document on stdout (the notes of what was written go to
    stderr, so stdout stays parseable), or the text followed by those notes."""
    print(document() if as_json else text())
    for line in written:
        print(line, file=sys.stderr if as_json else sys.stdout)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "trace": ("trace one input and print its density and per-size table", _add_trace, _run_trace),
}


# ---------------------------------------------------------------- density along a text (tl_strace.profile)
def format_profile(prof: Any) -> str:
    """A plain-text report of a density profile: header, then one line per position."""
    df = prof.to_dataframe()
    cfg = prof.config
    lines = [f"model {prof.model['name']} · {len(prof.str_tokens)} tokens · {len(prof.positions)} positions · "
             f"method {cfg['method']} ({cfg['weights']} weights)"]
    if cfg.get("attention", "faithful") != "faithful":
        from tl_strace.ablation import attention_label

        lines.append(f"attention: {cfg['attention']} — {attention_label(cfg['attention'])}; not a faithful measurement")
    d = prof.density
    lines.append(f"density (area under TV over log10 s): mean {float(d.mean()):.4f}, min {float(d.min()):.4f}, "
                 f"max {float(d.max()):.4f}")
    tvs = [c for c in df.columns if c.startswith("tv@")]
    head = (f"{'pos':>4}  {'token':<16} {'next':<16} {'predicted':<16} {'density':>8} "
            + " ".join(f"{c:>9}" for c in tvs) + f" {'entropy':>8}")
    lines += ["", head, "-" * len(head)]
    for _, row in df.iterrows():
        nxt = row["next_token"]
        nxt = "" if not isinstance(nxt, str) else repr(nxt)
        lines.append(f"{int(row['position']):>4}  {repr(row['token'])[:16]:<16} {nxt[:16]:<16} "
                     f"{repr(row['predicted'])[:16]:<16} {row['density']:>8.4f} "
                     + " ".join(f"{row[c]:>9.4f}" for c in tvs) + f" {row['entropy']:>8.3f}")
    return "\n".join(lines)


def _add_profile_options(p: argparse.ArgumentParser, text_help: str) -> None:
    """The arguments ``profile`` and ``generate`` share: the text, the trace options, the outputs."""
    _add_text_model_search(p, text_help)
    p.add_argument("--conditions", nargs="+", default=["only"], choices=_choices("conditions"),
                   help="conditions traced at every position (default: only, the trace itself)")
    _add_attention(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--batch-size", type=int, help="masks per forward pass (default: from the memory budget)")
    p.add_argument("--memory-budget", type=_bytes, metavar="SIZE",
                   help="the most memory one position's trace may use, e.g. 2GiB (see tl_strace.memory)")
    p.add_argument("--out", metavar="DIR", type=_PATH,
                   help="also write DIR/profile.safetensors (loadable with DensityProfile.load) and DIR/profile.csv "
                        "(created if missing; its parent must exist)")
    p.add_argument("--html", metavar="PATH", type=_FILE,
                   help="also write a standalone HTML page: the text coloured by density (offline)")
    p.add_argument("--json", action="store_true", help="print the per-position table as JSON instead of text")


def _add_profile(p: argparse.ArgumentParser) -> None:
    _add_profile_options(p, "the text; the prediction after each chosen token is traced")
    p.add_argument("--positions", type=int, nargs="+", metavar="T",
                   help="token positions (0-based, BOS included when the model adds one) whose next-token "
                        "prediction is traced (default: every position from the second token on)")
    p.add_argument("--no-targets", action="store_true",
                   help="do not use the text's next token as each position's target (no cross-entropy, rank)")


def _check_out_dir(path: str) -> None:
    """``--out DIR``: an existing writable directory, or a new one whose parent exists and is writable."""
    from pathlib import Path

    from tl_strace.fsutil import OutputPathError, check_output_path

    d = Path(path)
    if d.exists() and not d.is_dir():
        raise OutputPathError(f"--out {path!r} is not a directory; give a directory for the profile's files.")
    if d.is_dir():
        for name in ("profile.safetensors", "profile.csv"):
            check_output_path(d / name, what="--out file")
        return
    parent = d.parent if str(d.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"Cannot create --out {path!r}: {str(parent)!r} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"Cannot create --out {path!r}: the directory {str(parent)!r} is not writable.")


def _check_profile_args(args: argparse.Namespace) -> None:
    """Before the model is loaded: the text, the options (as strace checks them), the output paths."""
    from tl_strace.errors import InputError
    from tl_strace.fsutil import check_output_path
    from tl_strace.options import TraceOptions

    if not args.text.strip():
        raise InputError("The input text is empty (or only whitespace); give at least one word to predict from.")
    TraceOptions(method=args.method, weights=args.weights, conditions=args.conditions, sizes=args.sizes,
                 taus=args.taus, seed=args.seed, batch_size=args.batch_size, memory_budget=args.memory_budget,
                 attention=args.attention)
    if args.out:
        _check_out_dir(args.out)
    if args.html:
        check_output_path(args.html, what="--html file")


def _trace_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(sizes=args.sizes, method=args.method, taus=args.taus, weights=args.weights,
                conditions=args.conditions, seed=args.seed, batch_size=args.batch_size,
                memory_budget=args.memory_budget, attention=args.attention)


def _run_profile(args: argparse.Namespace) -> int:
    from tl_strace.errors import InputError

    _check_profile_args(args)
    if args.positions is not None:  # their range is checked against the text once it is tokenized
        bad = [t for t in args.positions if t < 0]
        if bad:
            raise InputError(f"Position {bad[0]} is negative; positions count tokens from 0.")
        if len(set(args.positions)) != len(args.positions):
            raise InputError("--positions names a position twice; give each position once.")
    import tl_strace as ts

    model = ts.load_model(args.model)
    prof = ts.density_profile(model, args.text, args.positions, next_token_targets=not args.no_targets,
                              **_trace_options(args))
    return _write_profile(prof, args)


def _write_profile(prof: Any, args: argparse.Namespace) -> int:
    """Print a profile (text or ``--json``) and write its ``--out`` / ``--html`` files."""
    from tl_strace.fsutil import atomic_write

    written = []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        prof.save(os.path.join(args.out, "profile.safetensors"))
        atomic_write(os.path.join(args.out, "profile.csv"), prof.to_dataframe().to_csv(index=False), what="--out file")
        written.append(f"profile saved to {os.path.join(args.out, 'profile.safetensors')} and profile.csv")
    if args.html:
        written.append(f"HTML page written to {prof.save_html(args.html)}")
    def document() -> str:
        rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in prof.to_dataframe().to_dict(orient="records")]  # NaN (no target, no next token): null
        return json.dumps({"positions": rows, "timings": prof.timings}, default=float, indent=1)

    _emit(args.json, document, lambda: format_profile(prof), written)
    return 0


COMMANDS["profile"] = ("trace the next-token prediction after every token of a text (its density profile)",
                       _add_profile, _run_profile)


def _add_generate(p: argparse.ArgumentParser) -> None:
    _add_profile_options(p, "the prompt the model continues greedily; the prediction of every generated token "
                            "is traced")
    p.add_argument("--max-new-tokens", type=int, default=20, help="how many tokens to generate (default 20)")
    p.add_argument("--no-stop-at-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g = p.add_argument_group("sampling (default: greedy; any of these samples instead, see tl_strace.Sampling)")
    g.add_argument("--temperature", type=float, help="divide the logits by T before sampling (default 1 when sampling)")
    g.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set of tokens whose probability "
                                                             "reaches P (nucleus sampling)")
    g.add_argument("--sample-top-k", type=int, metavar="K", help="sample from the K most likely tokens")
    g.add_argument("--sample-seed", type=int, metavar="S", help="seed of the sampler (default 0: the same text every run)")


def _run_generate(args: argparse.Namespace) -> int:
    from tl_strace.errors import InputError

    _check_profile_args(args)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1; got {args.max_new_tokens}.")
    import tl_strace as ts

    sampling = None
    chosen = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                ("top_k", args.sample_top_k), ("seed", args.sample_seed)) if v is not None}
    if chosen:
        sampling = ts.Sampling(**chosen)  # checked before the model is loaded
    model = ts.load_model(args.model)
    prof = ts.trace_generation(model, args.text, args.max_new_tokens, stop_at_eos=not args.no_stop_at_eos,
                               sampling=sampling, **_trace_options(args))
    if not args.json:
        P = prof.config["generation"]["prompt_tokens"]
        print(f"generated: {''.join(prof.str_tokens[P:])!r}")
    return _write_profile(prof, args)


COMMANDS["generate"] = ("generate from a prompt (greedily, or sampled) and trace the prediction of every generated token",
                        _add_generate, _run_generate)


# ---------------------------------------------------------------- corpus runs (tl_strace.corpus, tl_strace.analysis)
def _add_attention(p: argparse.ArgumentParser) -> None:
    """``--attention MODE`` and its two shorthands for the reference pipeline's mode (one of them allowed)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--attention", default=None, choices=_choices("attention"),
                   help="faithful (default): removed attention edges are removed; never-ablated: attention edges "
                        "are never removed, as in the authors' published pipeline (reproduces its curves; not a "
                        "faithful measurement, and labelled so in every output)")
    g.add_argument("--reproduce-reference-pipeline", dest="attention", action="store_const", const="never-ablated",
                   help="the same as --attention never-ablated")
    g.add_argument("--no-attention-ablation", dest="attention", action="store_const", const="never-ablated",
                   help="the older name of --attention never-ablated")


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=_NAME, help=f"bundled model ({_BUNDLED}), local directory, or hub name")
    p.add_argument("--data", required=True, type=_text_arg("data set name or file"), help=f"shipped set ({', '.join(_choices('sets'))}), a .jsonl/.tsv/.txt "
                   "file of passages, or wikitext[:config[:split]] (needs the internet or a datasets cache)")
    p.add_argument("--out", required=True, type=_PATH, help="run directory; rerun the same command to resume")
    p.add_argument("--granularity", default="token", choices=_choices("granularities"))
    p.add_argument("--ablation", default="zero", choices=_choices("ablations"))
    p.add_argument("--limit", type=int, help="trace only the first N passages (may grow between invocations)")
    p.add_argument("--conditions", nargs="+", default=["only"], choices=_choices("conditions"))
    p.add_argument("--method", default="strace", choices=_choices("methods"))
    p.add_argument("--weights", default="l1", choices=_choices("weights"))
    p.add_argument("--sizes", type=float, nargs="+", help="s-Trace target sizes (default: paper B's 26)")
    p.add_argument("--taus", type=float, nargs="+", help="thresholds for --method threshold/nucleus")
    p.add_argument("--record-sizes", type=float, nargs="+", default=None,
                   help="sizes at which each trace's heads and MLPs are recorded (default 1e-3 1e-2 0.1 0.4)")
    _add_attention(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="masks per forward pass (default: from the memory budget)")
    p.add_argument("--memory-budget", type=_bytes, metavar="SIZE",
                   help="the most memory one trace may use, e.g. 2GiB or 512MiB (see tl_strace.memory)")
    p.add_argument("--every-position", action="store_true",
                   help="also trace the prediction after every token of each passage (density along the text; "
                        "load_run(DIR).profile), from one clean forward per passage; token granularity")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_run(args: argparse.Namespace) -> int:
    from tl_strace.corpus import DEFAULT_RECORD_SIZES, run_corpus

    summary = run_corpus(args.model, args.data, args.out, granularity=args.granularity, ablation=args.ablation,
                         conditions=args.conditions, limit=args.limit, sizes=args.sizes, method=args.method,
                         taus=args.taus, weights=args.weights, seed=args.seed, batch_size=args.batch_size,
                         memory_budget=args.memory_budget,
                         attention=args.attention,
                         record_sizes=args.record_sizes or DEFAULT_RECORD_SIZES, every_position=args.every_position,
                         progress=not args.quiet)
    if summary.rank == 0:
        print(summary.report())
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", type=_PATH, help="run directories (several: compared where they match)")
    p.add_argument("--out", type=_PATH, help="output path without suffix (default: DIR/report)")
    p.add_argument("--format", nargs="+", default=["html", "md"], choices=["html", "md"])
    p.add_argument("--title", default="tl_strace corpus report")
    p.add_argument("--findings", metavar="FILE", type=_FILE,
                   help="also write the findings table (papers' findings 1-4, by fixed rules) into FILE's generated "
                        "block, e.g. docs/findings.md (see tl_strace.analysis.findings)")


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tl_strace.analysis import write_report
    from tl_strace.analysis.findings import check_findings_file, update_findings_file
    from tl_strace.fsutil import OutputPathError, check_output_path

    # before the runs are read and the report built: can its files be written?
    base = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    if base.suffix in (".html", ".md"):
        base = base.with_suffix("")
    anc = base.parent
    while not anc.exists() and anc.parent != anc:  # write_report creates missing directories
        anc = anc.parent
    if anc == base.parent:
        for fmt in args.format:
            check_output_path(base.with_suffix(f".{fmt}"), what="report file")
    elif not anc.is_dir():
        raise OutputPathError(f"Cannot write the report {str(base)!r}: {str(anc)!r} is not a directory.")
    elif not os.access(anc, os.W_OK | os.X_OK):
        raise OutputPathError(f"Cannot write the report {str(base)!r}: the directory {str(anc)!r} is not writable.")
    if args.findings:
        check_output_path(args.findings, what="--findings file")
        check_findings_file(args.findings)  # UTF-8, one block or none: before the report is built
    for path in write_report(args.dirs, args.out, formats=args.format, title=args.title):
        print(path)
    if args.findings:
        update_findings_file(args.findings, args.dirs)
        print(args.findings)
    return 0


COMMANDS["run"] = ("trace every passage of a data set, resumably (torchrun for several processes)",
                   _add_run, _run_run)
COMMANDS["report"] = ("write an HTML/Markdown report of corpus runs", _add_report, _run_report)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``tl-strace`` parser. With ``only``, only that subcommand gets its arguments (the
    others are listed with their help line): what :func:`main` uses, so the options of a command
    not being run, and the registries they read, are never loaded."""
    parser = _Parser(prog="tl-strace", description="s-Trace and computation density for "
                                     "TransformerLens models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or name == only:
            add(p)
    return parser


def _command_of(argv: Sequence[str]) -> str:
    """The subcommand ``argv`` names (its first argument not starting with ``-``), or ``""``."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else ""
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tl-strace``; errors tl_strace raises on purpose print as one line, exit 2."""
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(_main(sys.argv[1:]))
    return _main(sys.argv[1:] if argv is None else argv)


def _exit_now(code: int) -> NoReturn:
    """End a ``torchrun`` rank without interpreter finalization.

    Measured: a rank that had finished, written and fsynced every record and destroyed its gloo
    process group was still killed by SIGABRT ("terminate called without an active exception")
    while Python shut down, so torchrun reported the whole run as failed (seen once in CI in the
    two-rank test, not reproduced in 18 local runs; gloo's C++ threads meeting interpreter teardown,
    as described in pytorch/pytorch PR 179291). Every record is flushed and fsynced as it is written
    (``corpus._store._append``) and the group is destroyed before this point, so nothing is left for
    finalization to do but flush the standard streams, done here."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    args = build_parser(only=_command_of(argv)).parse_args(argv)
    import tl_strace.views  # noqa: F401  the result display methods' renderers (--html, reports)
    from tl_strace.errors import StraceError

    try:
        return COMMANDS[args.command][2](args)
    except (StraceError, OSError) as e:  # our errors, and a write the OS refused (full disk, permissions)
        if isinstance(e, OSError) and not isinstance(e, StraceError):
            msg = f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
        else:
            msg = str(e)
        print(f"tl-strace: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
