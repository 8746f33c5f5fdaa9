"""The search stage of this checkout against another revision, on the same graphs, side by side.

    python benchmarks/bench_search_vs.py --baseline HEAD~1 --real 128,300,580 --synthetic 30,9:256,512

Builds each graph once (``--real``: SmolLM2-135M's L1-weighted graph of the first T tokens of
``tests/data/passages_en.txt``; ``--synthetic L,H:T,...``: i.i.d. uniform weights to the 8th power,
as ``bench_search.py``), saves it, then for every graph runs the two revisions **alternately, each in
a fresh process** (``benchmarks/_search_worker.py`` with ``PYTHONPATH`` on that revision's tree, a
``git worktree`` of ``--baseline``): s-Trace's strata at paper B's 26 sizes (the whole order, kept as
``rank``) and the random baseline's. It reports the times, the peak extra memory, their ratios, and
whether both revisions give identical strata (labels and ranks hashed; a difference stops the run).
Writes ``benchmarks/results/search_vs-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _util import write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_search_worker.py"


def build_graphs(out: Path, real: list[int], synthetic: tuple[int, int, list[int]] | None) -> list[tuple[str, Path]]:
    """Save each graph (weights, valid, shape) as safetensors; return (name, path) pairs."""
    import torch
    from safetensors.torch import save_file

    from tl_strace.graph import EdgeLayout

    graphs = []
    if real:
        import tl_strace as ts
        from tl_strace.graph import node_vectors
        from tl_strace.model import clean_run, describe_model, model_guard
        from tl_strace.weights import compute_weights

        model = ts.load_model("smollm2-135m", progress=False)
        spec = describe_model(model)
        text = (ROOT / "tests" / "data" / "passages_en.txt").read_text(encoding="utf-8")
        tokens = model.to_tokens(text)[0]
        for T in real:
            if T > tokens.numel():
                raise SystemExit(f"the text has {tokens.numel()} tokens; --real {T} is longer")
            with model_guard(model):
                run = clean_run(model, spec, tokens[:T])
            layout = EdgeLayout(spec.n_layers, spec.n_heads, T, parallel=spec.parallel)
            g = compute_weights(node_vectors(run), layout, "l1")
            path = out / f"smollm2-{T}.safetensors"
            save_file({"weights": g.weights, "valid": g.valid,
                       "shape": torch.tensor([spec.n_layers, spec.n_heads, T])}, str(path))
            graphs.append((f"SmolLM2 {T}", path))
            del run, g
    if synthetic is not None:
        L, H, lengths = synthetic
        for T in lengths:
            layout = EdgeLayout(L, H, T)
            valid = layout.ancestors()
            w = torch.rand(layout.size, generator=torch.Generator().manual_seed(0))
            w.pow_(8).masked_fill_(~valid, 0.0)
            path = out / f"synthetic-{L}x{H}-{T}.safetensors"
            save_file({"weights": w, "valid": valid, "shape": torch.tensor([L, H, T])}, str(path))
            graphs.append((f"synthetic {L}x{H} {T}", path))
    return graphs


def run_worker(tree: Path, graph: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    res = subprocess.run([sys.executable, str(WORKER), str(graph), str(tree)], env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker failed on {graph} with {tree}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="HEAD", help="the git revision to compare with (default HEAD)")
    ap.add_argument("--real", default="128,300", help="SmolLM2 graph lengths, comma-separated ('' for none)")
    ap.add_argument("--synthetic", default="", help="L,H:T1,T2,... synthetic graphs ('' for none)")
    ap.add_argument("--repeat", type=int, default=1, help="alternating runs of each revision per graph")
    args = ap.parse_args()
    real = [int(x) for x in args.real.split(",") if x]
    synthetic = None
    if args.synthetic:
        shape, lengths = args.synthetic.split(":")
        L, H = (int(x) for x in shape.split(","))
        synthetic = (L, H, [int(x) for x in lengths.split(",")])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base_tree = tmp_path / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.baseline],
                       check=True)
        try:
            graphs = build_graphs(tmp_path, real, synthetic)
            rows = []
            print(f"{'graph':>22} {'edges':>12} {'what':>8} {'baseline':>10} {'this':>10} {'ratio':>6} "
                  f"{'peak base':>10} {'peak this':>10} {'ratio':>6}  same strata", flush=True)
            for name, path in graphs:
                runs: dict[str, list[dict]] = {"baseline": [], "this": []}
                for _ in range(args.repeat):
                    runs["baseline"].append(run_worker(base_tree, path))
                    runs["this"].append(run_worker(ROOT, path))
                b, t = (min(r, key=lambda x: x["strace_s"] + x["random_s"]) for r in runs.values())
                same = b["hash"] == t["hash"]
                row = {"graph": name, "edges": t["edges"], "slots": t["slots"], "baseline": b, "this": t,
                       "same_strata": same}
                for what in ("strace", "random"):
                    ts_, tb = t[f"{what}_s"], b[f"{what}_s"]
                    pt, pb = t[f"{what}_peak"], b[f"{what}_peak"]
                    row[f"{what}_time_ratio"], row[f"{what}_peak_ratio"] = ts_ / tb, pt / max(pb, 1)
                    print(f"{name:>22} {t['edges']:>12,} {what:>8} {tb:>9.2f}s {ts_:>9.2f}s {ts_ / tb:>6.2f} "
                          f"{pb / 2**20:>9.0f}M {pt / 2**20:>9.0f}M {pt / max(pb, 1):>6.2f}  {same}", flush=True)
                rows.append(row)
                if not same:
                    raise SystemExit(f"{name}: the two revisions' strata differ")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    print(write("search_vs", {"baseline": args.baseline, "rows": rows}))


if __name__ == "__main__":
    main()
