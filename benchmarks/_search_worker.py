"""One revision's search on one saved graph, in a fresh process (``bench_search_vs.py`` runs it with
``PYTHONPATH`` on that revision's tree). Prints one JSON line: times, peak extra memory, and a hash
of the strata (s-Trace's labels and ranks, the random baseline's labels)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(1, str(Path(__file__).parent))  # after PYTHONPATH: the revision's tl_strace comes first

from _util import exact_rss, peak_memory  # noqa: E402

exact_rss()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import tl_strace  # noqa: E402
from tl_strace.graph import EdgeLayout, Graph  # noqa: E402
from tl_strace.search import random_strata, strace_strata  # noqa: E402


def main() -> None:
    graph_path, tree = sys.argv[1], Path(sys.argv[2]).resolve()
    if Path(tl_strace.__file__).resolve().parent.parent != tree:
        raise SystemExit(f"imported {tl_strace.__file__}, not the tree {tree}")
    d = load_file(graph_path)
    L, H, T = d["shape"].tolist()
    layout = EdgeLayout(L, H, T)
    graph = Graph(layout, d["weights"], d["valid"])
    small = EdgeLayout(2, 2, 3)  # a warm-up call: one-off costs (imports, compiled code) are not the search's
    warm = Graph(small, torch.rand(small.size) * small.ancestors(), small.ancestors())
    random_strata(warm, [1, 2, 3], [0.1, 0.2, 1.0])
    strace_strata(warm)
    t = time.perf_counter()
    st, p_s = peak_memory(lambda: strace_strata(graph))
    t_s = time.perf_counter() - t
    t = time.perf_counter()
    rnd, p_r = peak_memory(lambda: random_strata(graph, st.counts.tolist(), st.sizes.tolist()))
    t_r = time.perf_counter() - t
    h = hashlib.sha256()
    for x in (st.labels, st.rank, rnd.labels):
        h.update(x.long().numpy().tobytes())
    print(json.dumps({"edges": graph.n_edges, "slots": layout.n_attn, "strace_s": t_s, "strace_peak": p_s,
                      "random_s": t_r, "random_peak": p_r, "hash": h.hexdigest(),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
