"""The search stage alone on large graphs (issue 17): s-Trace's strata and the random baseline's,
time and peak extra memory, on synthetic weights of any model shape.

    python benchmarks/bench_search.py --shape 30,9 --lengths 256,512 [--reference-max 256]
    python benchmarks/bench_search.py --shape 32,32 --lengths 1024 --searches strace   # a 7B-shaped graph

For each length it builds one graph (i.i.d. uniform float32 weights raised to the 8th power, so a
few edges dominate each node as in real graphs; only the search's cost is measured, not a model's
weights), then measures, each in a fresh state:

* ``strace``: :func:`tl_strace.search.strace_strata` at paper B's 26 sizes (the whole order: the
  result keeps it as ``rank``);
* ``random``: :func:`tl_strace.search.random_strata` with those counts — its order is computed only
  where a count cuts a run of tied bottlenecks (``strace_order`` §5), large runs with tensors;
* ``random, whole order`` (up to ``--reference-max`` tokens): the same strata from the whole random
  order (every tied run replayed, none skipped), side by side, and a check that both give the same
  labels. ``bench_search_vs.py`` compares two revisions of the search on the same graphs.

Peak memory is the kernel's peak resident set above the one before the call (``_util.peak_memory``,
glibc's mmap threshold pinned so freed tensors leave the resident set), per edge slot
(``L·H·T²``) and per causal edge. A length whose graph does not fit this machine's available
memory (by :data:`tl_strace.memory.EDGE_SLOT_BYTES`, plus :data:`~tl_strace.memory.RANDOM_SLOT_BYTES`
when the random search runs, per slot: the whole call's bound, an overestimate of the search alone)
is reported as such, not run; ``--searches strace`` runs s-Trace's search alone (the random
baseline's float64 weights need 8 more bytes per slot before its search starts).
Writes ``benchmarks/results/search-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import exact_rss, peak_memory, write  # noqa: E402

exact_rss()

import torch  # noqa: E402

import tl_strace.search._cascade as cascade  # noqa: E402
import tl_strace.search.strace as strace_mod  # noqa: E402
from tl_strace.graph import EdgeLayout, Graph  # noqa: E402
from tl_strace.memory import EDGE_SLOT_BYTES, RANDOM_SLOT_BYTES, available_memory  # noqa: E402
from tl_strace.search import DEFAULT_SIZES, random_order, random_strata, strace_strata, target_counts  # noqa: E402
from tl_strace.search._strata import _strata_from_order  # noqa: E402


def synthetic_graph(L: int, H: int, T: int, seed: int = 0) -> Graph:
    layout = EdgeLayout(L, H, T)
    valid = layout.ancestors()
    w = torch.rand(layout.size, generator=torch.Generator().manual_seed(seed))
    w.pow_(8).masked_fill_(~valid, 0.0)
    return Graph(layout, w, valid)


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out, peak = peak_memory(fn)
    return out, time.perf_counter() - t, peak


def whole_order_random(graph: Graph, counts: list[int]):  # noqa: ANN201
    """The random strata from the whole random order (every tied run replayed by the compiled heap,
    none skipped), as computed before issue 17's cuts: the check that skipping runs changes nothing."""
    old = strace_mod._TENSOR_RUN
    strace_mod._TENSOR_RUN = 1 << 62
    try:
        partial = [c for c in counts if c < graph.n_edges]
        order = random_order(graph, max(partial) if partial else 0)
        return _strata_from_order("random", graph, order, DEFAULT_SIZES, counts, DEFAULT_SIZES)
    finally:
        strace_mod._TENSOR_RUN = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="30,9", help="layers,heads (default SmolLM2-135M's 30,9)")
    ap.add_argument("--lengths", default="128,256")
    ap.add_argument("--reference-max", type=int, default=256, help="longest input for the whole-order reference")
    ap.add_argument("--searches", default="strace,random", help="which searches: strace, random or both")
    ap.add_argument("--force", action="store_true", help="run even where the whole call's bound exceeds the memory "
                    "available (the search alone needs less; watch the machine)")
    args = ap.parse_args()
    L, H = (int(x) for x in args.shape.split(","))
    rows = []
    print(f"shape {L} layers x {H} heads, torch threads {torch.get_num_threads()}, "
          f"tensor runs above {strace_mod._TENSOR_RUN_CUTS} (cuts) / {strace_mod._TENSOR_RUN} (whole order), "
          f"plain heap up to {cascade.SMALL}", flush=True)
    print(f"{'T':>5} {'slots':>13} {'edges':>12} {'what':>20} {'time':>8} {'peak':>9} {'B/slot':>7} {'B/edge':>7}")
    for T in (int(x) for x in args.lengths.split(",")):
        slots = L * H * T * T
        searches = args.searches.split(",")
        need = (EDGE_SLOT_BYTES + (RANDOM_SLOT_BYTES if "random" in searches else 0)) * slots
        avail = available_memory()
        if avail is not None and need > avail and not args.force:
            print(f"{T:>5} {slots:>13,} needs {need / 2**30:.1f} GiB by the bound, {avail / 2**30:.1f} GiB available: not run")
            rows.append({"T": T, "slots": slots, "skipped": f"needs {need} bytes, {avail} available"})
            continue
        graph = synthetic_graph(L, H, T)
        E = graph.n_edges
        counts = target_counts(DEFAULT_SIZES, E)
        st, t_s, p_s = timed(lambda: strace_strata(graph))
        row = {"T": T, "slots": slots, "edges": E, "strace_s": t_s, "strace_peak": p_s}
        done = [("strace", t_s, p_s)]
        if "random" not in searches:
            print(f"{T:>5} {slots:>13,} {E:>12,} {'strace':>20} {t_s:>7.2f}s {p_s / 2**20:>8.0f}M {p_s / slots:>7.1f} "
                  f"{p_s / E:>7.1f}", flush=True)
            rows.append(row)
            del graph, st
            continue
        rnd, t_r, p_r = timed(lambda: random_strata(graph, st.counts.tolist(), st.sizes.tolist()))
        row |= {"random_s": t_r, "random_peak": p_r}
        done.append(("random", t_r, p_r))
        for what, t, p in done:
            print(f"{T:>5} {slots:>13,} {E:>12,} {what:>20} {t:>7.2f}s {p / 2**20:>8.0f}M {p / slots:>7.1f} {p / E:>7.1f}",
                  flush=True)
        if T <= args.reference_max:
            ref, t_w, p_w = timed(lambda: whole_order_random(graph, counts))
            same = bool(torch.equal(ref.labels.long(), rnd.labels.long()))
            row |= {"random_whole_order_s": t_w, "random_whole_order_peak": p_w, "same_labels": same,
                    "time_ratio": t_r / t_w, "peak_ratio": p_r / p_w}
            print(f"{T:>5} {slots:>13,} {E:>12,} {'random, whole order':>20} {t_w:>7.2f}s {p_w / 2**20:>8.0f}M "
                  f"{p_w / slots:>7.1f} {p_w / E:>7.1f}   same labels: {same}; time x{t_r / t_w:.2f}, peak x{p_r / p_w:.2f}",
                  flush=True)
            if not same:
                raise SystemExit("the random strata differ from the whole order's")
        rows.append(row)
        del graph, st, rnd
    print(write("search", {"shape": [L, H], "rows": rows}))


if __name__ == "__main__":
    main()
