"""A density profile against separate strace calls on each prefix, side by side (issue 18, acceptance 2).

    python benchmarks/bench_profile.py [--model smollm2-135m] [--words 40] [--conditions only]
                                       [--sizes ...] [--repeat 1] [--device cpu|cuda]

The profile of every position of a passage (:func:`tl_strace.density_profile`: one clean forward,
each prefix's clean run sliced from it) and the sum of ``strace(model, tokens[:t + 1])`` over the
same positions, run in alternation so machine load affects both alike; both with the same options
and the text's next token as target. Prints the ratio (issue 18 asks for <= 0.8) and the parts
(forward / graph / search / evaluate) of each side, and the profile with ``shared_forward=False``
(a clean forward per prefix) as a third column. Writes benchmarks/results/profile-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from _util import PASSAGE_40, write  # noqa: E402

import tl_strace as ts  # noqa: E402

PARTS = ("forward", "graph", "search", "evaluate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--words", type=int, default=40, help="the first N words of the 40-word passage")
    ap.add_argument("--conditions", nargs="+", default=["only"])
    ap.add_argument("--sizes", type=float, nargs="+", default=None, help="default: paper B's 26")
    ap.add_argument("--repeat", type=int, default=1, help="alternating repeats (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-per-prefix", action="store_true", help="skip the shared_forward=False column (a third less time)")
    args = ap.parse_args()
    model = ts.load_model(args.model, device=args.device)
    text = " ".join(PASSAGE_40.split()[: args.words])
    tokens = model.to_tokens(text)[0]
    T = int(tokens.numel())
    positions = list(range(1, T))
    opts = dict(sizes=args.sizes, conditions=args.conditions)

    def profile(shared: bool) -> dict[str, float]:
        t = time.perf_counter()
        prof = ts.density_profile(model, tokens, positions, shared_forward=shared, **opts)
        return {"total": time.perf_counter() - t, **{k: prof.timings[k] for k in PARTS}}

    def separate() -> dict[str, float]:
        out = {"total": 0.0, **{k: 0.0 for k in PARTS}}
        for t in positions:
            t0 = time.perf_counter()
            res = ts.strace(model, tokens[: t + 1], target=int(tokens[t + 1]) if t + 1 < T else None, **opts)
            out["total"] += time.perf_counter() - t0
            for k in PARTS:
                out[k] += res.timings[k]
        return out

    ts.strace(model, tokens[:4], **opts)  # warm-up: first-call costs (attention check, allocator) on neither side
    runs: dict[str, list[dict[str, float]]] = {"profile": [], "separate": [], "profile_per_prefix_forward": []}
    for _ in range(args.repeat):
        runs["profile"].append(profile(True))
        runs["separate"].append(separate())
        if not args.no_per_prefix:
            runs["profile_per_prefix_forward"].append(profile(False))
    nan = {k: float("nan") for k in ("total", *PARTS)}
    med = {name: ({k: statistics.median(r[k] for r in rs) for k in rs[0]} if rs else nan) for name, rs in runs.items()}
    ratio = med["profile"]["total"] / med["separate"]["total"]
    ratio_pp = med["profile_per_prefix_forward"]["total"] / med["separate"]["total"]
    print(f"{args.model} on {args.device}, {torch.get_num_threads()} thread(s): {args.words} words = {T} tokens, "
          f"{len(positions)} positions, conditions {args.conditions}, "
          f"{len(args.sizes) if args.sizes else len(ts.DEFAULT_SIZES)} sizes, median of {args.repeat}")
    print(f"{'part (s)':<12} {'profile':>10} {'separate':>10} {'per-prefix':>11}")
    for k in ("total", *PARTS):
        print(f"{k:<12} {med['profile'][k]:>10.2f} {med['separate'][k]:>10.2f} "
              f"{med['profile_per_prefix_forward'][k]:>11.2f}")
    print(f"ratio profile / separate: {ratio:.3f} (issue 18 asks <= 0.8); per-prefix forwards: {ratio_pp:.3f}")
    path = write("profile", {"model": args.model, "words": args.words, "tokens": T, "positions": len(positions),
                             "conditions": args.conditions, "sizes": args.sizes, "repeat": args.repeat,
                             "median": med, "ratio": ratio, "ratio_per_prefix_forward": ratio_pp, "runs": runs})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
