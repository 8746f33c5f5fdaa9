"""The bundled real models, one by one: load time, one s-Trace call on a 40-word passage, the graph.

For each model named on the command line (default: every bundled model whose packages are
installed) it records, on this machine:

* load time: first (the one-time GGUF conversion into a fresh cache directory, when ``--fresh``)
  and cached (the converted directory read back);
* ``check_model``: the worst relative error of the edge sums and of the full graph's logits;
* one ``strace`` call with the defaults on the 40-word passage of :mod:`benchmarks._util`: wall
  time, edge count, density, the size at which the full model's top token returns, TV at s = 1;
* the same call's TV against the random baseline at the sizes in [1e-2, 0.4].

Run: ``HF_HUB_OFFLINE=1 python benchmarks/bench_real_models.py [--fresh] [names ...]``; writes
``benchmarks/results/real_models-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._util import PASSAGE_40, machine  # noqa: E402
from tl_strace import check_model, load_model, strace  # noqa: E402
from tl_strace.io import bundled  # noqa: E402


def top_token_size(res: Any) -> float | None:
    """Smallest s whose subgraph's top token is the full model's."""
    df = res.to_dataframe()
    only = df[df.condition == "only"]
    hit = only[only.top_token == res.full_top_strs[0]]
    return float(hit["size"].min()) if len(hit) else None


def measure(name: str, *, fresh: bool) -> dict[str, Any]:
    spec = bundled.bundled_spec(name)
    assert spec is not None, name
    out: dict[str, Any] = {"model": spec.key, "summary": spec.summary}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = tmp if fresh else None  # fresh: the one-time conversion is timed, then read back
        if fresh:
            t = time.perf_counter()
            load_model(spec.key, device="cpu", cache_dir=cache_dir)
            out["load_first_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        model = load_model(spec.key, device="cpu", cache_dir=cache_dir)
        out["load_cached_s"] = round(time.perf_counter() - t, 1)
    n_params = sum(p.numel() for p in model.original_model.parameters())
    out.update(n_params=n_params, n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads, d_model=model.cfg.d_model)
    t = time.perf_counter()
    errs = check_model(model, PASSAGE_40)
    out["check_model_s"] = round(time.perf_counter() - t, 1)
    out["check_model_worst"] = max(errs.values())
    out["full_graph_logits_err"] = errs["full graph logits"]
    t = time.perf_counter()
    res = strace(model, PASSAGE_40)
    out["strace_s"] = round(time.perf_counter() - t, 1)
    sizes = res.sizes.numpy()
    only = res.curve("tv", "only").numpy()
    rand = res.curve("tv", "random").numpy()
    band = [(float(s), float(a), float(b)) for s, a, b in zip(sizes, only, rand) if 1e-2 <= s <= 0.4]
    out.update(
        n_tokens=len(res.str_tokens),
        n_edges=int(res.n_edges),
        density=round(float(res.density), 3),
        full_top_token=res.full_top_strs[0],
        top_token_returns_at=top_token_size(res),
        tv_at_full=float(res.full_graph_tv),  # the full graph against the clean forward (curves: 0 at s = 1)
        tv_only_vs_random_in_band=band,
        beats_random_in_band=sum(a < b for _, a, b in band),
        band_sizes=len(band),
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="bundled model names (default: every installed one)")
    ap.add_argument("--fresh", action="store_true", help="also time the first load (conversion into a fresh cache)")
    args = ap.parse_args()
    names = args.names or [k for k, m in bundled.BUNDLED.items() if not m.missing_parts()]
    rows = []
    for name in names:
        row = measure(name, fresh=args.fresh)
        print(json.dumps(row, default=str))
        rows.append(row)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(__file__).parent / "results" / f"real_models-{device}.json"
    old = json.loads(path.read_text())["models"] if path.is_file() else []  # keep other models' rows
    merged = [r for r in old if r["model"] not in {x["model"] for x in rows}] + rows
    path.write_text(json.dumps({"machine": machine(), "models": merged}, indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
