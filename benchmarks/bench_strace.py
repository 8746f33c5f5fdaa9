"""s-Trace at the speed of the forward pass: every ratio of issue "Performance", measured side by side.

    python benchmarks/bench_strace.py [--model smollm2-135m] [--repeat 5] [--device cpu|cuda] [--dtype float32]

Prints each ratio with its parts and writes benchmarks/results/strace-<device>.json. Memory is
measured by bench_memory.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from _util import PASSAGE_40, interleaved, timeit, write  # noqa: E402

import tl_strace as ts  # noqa: E402
from tl_strace.ablation import MaskRow, masked_logprobs  # noqa: E402
from tl_strace.graph import EdgeLayout, check_decomposition, node_vectors  # noqa: E402
from tl_strace.model import clean_run, describe_model, model_guard, prepare_tokens, run_hooked  # noqa: E402
from tl_strace.search import strace_strata  # noqa: E402
from tl_strace.weights import compute_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = ts.load_model(args.model, device=args.device, dtype=dtype)
    spec = describe_model(model)
    tokens = prepare_tokens(model, spec, PASSAGE_40)
    T = tokens.numel()
    layout = EdgeLayout(spec.n_layers, spec.n_heads, T)
    K = len(ts.DEFAULT_SIZES)
    batch = tokens[None].expand(K, -1)

    # --- the parts of one call, each on its own
    def forward1() -> None:
        with torch.no_grad():
            model(tokens[None])

    def cached() -> object:
        return clean_run(model, spec, tokens)

    run = cached()

    def graph() -> object:
        vec = node_vectors(run)
        check_decomposition(run, vec, rel_tol=1e-4 if dtype == torch.float32 else 2e-2)
        return compute_weights(vec, layout, "l1")

    g = graph()

    def search() -> object:
        return strace_strata(g)

    strata = search()
    rows = [MaskRow(0, k) for k in range(K)]

    def masked() -> None:
        with model_guard(model):
            for _ in masked_logprobs(model, spec, tokens, layout, [strata.labels], rows, chunk=K):
                pass

    def plain_batched() -> None:
        with torch.no_grad():
            model(batch)

    def plain_batched_last() -> None:  # same work as the masked forward minus the masks
        with model_guard(model):
            run_hooked(model, batch, [], backend=spec.backend)

    def sequential28() -> None:
        with torch.no_grad():
            for _ in range(K + 1):
                model(tokens[None])

    def whole() -> object:
        return ts.strace(model, tokens, conditions=["only"])

    res = whole()  # warm (also runs the once-per-model masking check)
    t = interleaved({"forward1": forward1, "cached_forward": cached, "graph_weights": graph, "search": search,
                     "masked_batched": masked, "plain_batched": plain_batched,
                     "plain_batched_last": plain_batched_last, "whole_call": whole},
                    repeat=args.repeat)
    t["sequential_28"] = timeit(sequential28, repeat=max(2, args.repeat // 2))
    floor = t["cached_forward"] + t["plain_batched"]
    overhead = t["graph_weights"] + t["search"]
    ratios = {
        "hook_overhead (masked / plain batched, both last-position unembed)": t["masked_batched"] / t["plain_batched_last"],
        "masked / plain batched (plain computes all positions' logits)": t["masked_batched"] / t["plain_batched"],
        "graph+weights+search share of a whole call": overhead / t["whole_call"],
        "whole call / dense floor (cached forward + plain batched forward of the strata)": t["whole_call"] / floor,
        "whole call / 28 sequential single forwards": t["whole_call"] / t["sequential_28"],
    }
    targets = {"hook_overhead (masked / plain batched, both last-position unembed)": 1.1,
               "graph+weights+search share of a whole call": 0.10,
               "whole call / dense floor (cached forward + plain batched forward of the strata)": 1.15}

    print(f"model {spec.name} on {args.device} ({args.dtype}), {T} tokens, {res.n_edges:,} edges, {K} strata")
    for k, v in t.items():
        print(f"  {k:>20}: {v * 1000:9.1f} ms")
    for k, v in ratios.items():
        tgt = targets.get(k)
        mark = "" if tgt is None else ("  (target ≤ %g: %s)" % (tgt, "met" if v <= tgt else "MISSED"))
        print(f"  {k}: {v:.3f}{mark}")
    path = write("strace", {"model": spec.name, "device": args.device, "dtype": args.dtype, "n_tokens": T,
                            "n_edges": res.n_edges, "n_strata": K, "times_s": t, "ratios": ratios,
                            "targets": targets, "timings_inside_call": res.timings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
