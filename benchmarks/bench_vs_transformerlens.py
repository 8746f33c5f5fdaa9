"""Evaluating 27 node-level circuits: tl_strace's batched component evaluation against
TransformerLens 4.3's own circuit evaluation (``tools.analysis.attribution_patching.faithfulness``).

    python benchmarks/bench_vs_transformerlens.py [--tokens 12] [--tl-circuits 1]

What is compared, so that both sides compute the same thing:

* **Model.** ``faithfulness`` refuses grouped-query attention (its K/V readers are per query head),
  and SmolLM2-135M has 9 query heads over 3 K/V heads. The script therefore builds
  *SmolLM2-135M with its K/V heads repeated* (``num_key_value_heads = 9``, each K/V projection
  copied to the three query heads that share it): the same function (its logits are checked equal
  to the original's), in a form TransformerLens accepts. Both sides run on it.
* **Circuits.** The 27 nested node-level circuits of one ``component_strace`` call (heads and MLPs,
  all positions; sizes :data:`tl_strace.DEFAULT_SIZES`). In TransformerLens terms a circuit keeps
  every edge out of the embedding and out of each kept head/MLP, at every position, and ablates
  every other edge.
* **Ablation.** Mean ablation by position over the same 8 calibration passages on both sides
  (``FaithfulnessConfig(ablation="mean")`` with ``mean_tokens``; ``compute_means(...)`` with
  ``mean_positions="per_position"``). Ablating every outgoing edge of a writer equals replacing
  that writer's output, so the two evaluate the same circuit.
* **Outputs.** The metric passed to ``faithfulness`` records the logits it is given; the ablated
  run's last-position distribution is compared with ours before anything is timed (max |Δ log p|
  and total variation; the script stops if they disagree).

Timed: our ``evaluate_components`` for all 27 circuits (batched forwards), against
``faithfulness`` once per circuit (what its API offers: one circuit per call; it also re-enumerates
the edge graph, re-computes the means and runs one extra forward per retained edge class). Because
one call takes about a minute on 2 CPU cores, ``--tl-circuits`` of the 27 (spread over the sizes,
from the smallest; default 1) are timed and the per-circuit mean is multiplied by 27; ``--tl-circuits 27`` times them
all. Also timed, as the nearest equivalent to a lean TransformerLens implementation: its private
``_ablate_edges`` alone (one forward per circuit with the graph and the replacements precomputed).
Writes ``benchmarks/results/vs_transformerlens-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from _util import timeit, write  # noqa: E402

import tl_strace as ts  # noqa: E402
from tl_strace.components import component_table, evaluate_components, parse_component  # noqa: E402
from tl_strace.io.models import bundled_model_dir, default_cache_root  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "passages_en.txt"


def smollm2_mha_dir() -> Path:
    """SmolLM2-135M with each K/V head repeated for the query heads that share it (cached)."""
    from safetensors.torch import load_file, save_file

    src = bundled_model_dir("smollm2-135m")
    dst = default_cache_root() / "models" / "smollm2-135m-kv-repeated"
    if (dst / "model.safetensors").exists():
        return dst
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json", "tl_strace_cache.json"):
            shutil.copy(f, tmp / f.name)
    cfg = json.loads((src / "config.json").read_text())
    H, KV, dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    cfg["num_key_value_heads"] = H
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = load_file(src / "model.safetensors")
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            # query head h reads K/V head h // (H // KV): repeat each K/V head's rows H // KV times
            sd[k] = sd[k].reshape(KV, dh, -1).repeat_interleave(H // KV, dim=0).reshape(H * dh, -1).contiguous()
    save_file(sd, tmp / "model.safetensors")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=12, help="passage length in tokens, BOS included")
    ap.add_argument("--tl-circuits", type=int, default=1, help="how many of the 27 circuits to run through TL")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from transformer_lens.tools.analysis import attribution_patching as ap_tl

    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    gqa = ts.load_model("smollm2-135m")
    model = ts.load_model(str(smollm2_mha_dir()))
    T = args.tokens
    passages = [line for line in TEXT.read_text().splitlines() if line.strip()]
    toks = [model.to_tokens(p)[0, :T] for p in passages]
    clean, corrupt = toks[0][None], toks[1][None]
    mean_tokens = torch.stack(toks[2:10])
    same = float((gqa(clean)[0, -1] - model(clean)[0, -1]).abs().max())
    if same > 1e-4:
        raise SystemExit(f"the K/V-repeated model differs from SmolLM2 by {same:.3g}")
    del gqa

    # --- the 27 circuits: one component-level s-Trace with per-position mean ablation
    means = ts.compute_means(model, mean_tokens)
    res = ts.component_strace(model, clean[0], ablation="mean", means=means, mean_positions="per_position",
                              sizes=ts.DEFAULT_SIZES)
    table = component_table(res)
    circuits = [table.loc[table["first_size"] <= s, "name"].tolist() for s in res.sizes.tolist()]
    K = len(circuits)

    def ours() -> torch.Tensor:
        return evaluate_components(model, clean[0], circuits, ablation="mean", means=means,
                                   mean_positions="per_position")

    ours_logp = ours()
    t_ours = timeit(ours, repeat=args.repeat)

    # --- TransformerLens: the same circuits as edge lists
    target = int(ours_logp[-1].argmax())  # the full model's top token (row K-1 keeps everything)
    seen: list[torch.Tensor] = []

    def metric(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits[0, -1].detach().float().clone())
        return torch.log_softmax(logits[0, -1].float(), -1)[target]

    L = model.cfg.n_layers
    with ap_tl._edge_hook_flags(model):
        cache = ap_tl.cache_activation_and_gradient(model, corrupt, metric, names_filter=ap_tl._edge_hook_names(L),
                                                    compute_gradient=False)
        edges = ap_tl.enumerate_edges(model, cache)
        replacements = ap_tl._mean_writer_contributions(model, mean_tokens)
    del cache

    def as_edges(names: list[str]) -> list:
        keep = set()
        for n in names:
            layer, head, _ = parse_component(n)
            keep.add(("mlp_out", layer, None) if head < 0 else ("attn_head_out", layer, head))
        return [e for e in edges if e[0].kind == "embed" or (e[0].kind, e[0].layer, e[0].head) in keep]

    picks = sorted({round(i * (K - 1) / max(1, args.tl_circuits - 1)) for i in range(args.tl_circuits)})
    tl_times, kernel_times, agree = [], [], []
    for i in picks:
        kept = as_edges(circuits[i])
        seen.clear()
        t = time.perf_counter()
        fr = ap_tl.faithfulness(model, clean, corrupt, metric, kept, ap_tl.FaithfulnessConfig(ablation="mean"),
                                mean_tokens=mean_tokens)
        tl_times.append(time.perf_counter() - t)
        tl_logp = torch.log_softmax(seen[2], -1)  # calls: corrupt run, clean run, the ablated run, classes
        d = float((tl_logp - ours_logp[i]).abs().max())
        tv = float(0.5 * (tl_logp.exp() - ours_logp[i].exp()).abs().sum())
        agree.append({"circuit": i, "components": len(circuits[i]), "edges_kept": len(kept),
                      "max_abs_dlogp": d, "tv": tv, "tl_recovered": fr.recovered})
        if not (d < 1e-3 and tv < 1e-4):
            raise SystemExit(f"circuit {i}: TransformerLens and tl_strace disagree (max |Δ log p| {d:.3g}, TV {tv:.3g})")
        with ap_tl._edge_hook_flags(model):
            t = time.perf_counter()
            ap_tl._ablate_edges(model, clean, edges, kept, replacements)
            kernel_times.append(time.perf_counter() - t)
        print(f"  circuit {i:>2}: {len(circuits[i]):>3} components, {len(kept):>9,} of {len(edges):,} edges kept; "
              f"faithfulness {tl_times[-1]:6.1f} s, _ablate_edges {kernel_times[-1]:5.1f} s; "
              f"agree: max |Δ log p| {d:.1e}, TV {tv:.1e}", flush=True)

    tl_per = statistics.mean(tl_times)
    kernel_per = statistics.mean(kernel_times)
    ratios = {
        "faithfulness once per circuit / ours, 27 circuits": tl_per * K / t_ours,
        "TL _ablate_edges once per circuit (graph and means precomputed) / ours": kernel_per * K / t_ours,
    }
    print(f"model SmolLM2-135M with K/V heads repeated, {T} tokens, {len(edges):,} TL edges, "
          f"{res.n_edges} components, {K} circuits")
    print(f"  ours: evaluate_components, 27 circuits: {t_ours:.2f} s ({t_ours / K * 1000:.0f} ms per circuit)")
    print(f"  TransformerLens faithfulness: {tl_per:.1f} s per circuit (mean of {len(tl_times)}) → "
          f"{tl_per * K:.0f} s for 27" + (" (extrapolated)" if len(tl_times) < K else ""))
    print(f"  TransformerLens _ablate_edges alone: {kernel_per:.1f} s per circuit")
    for k, v in ratios.items():
        mark = f"  (target ≥ 5: {'met' if v >= 5 else 'MISSED'})" if k.startswith("faithfulness") else ""
        print(f"  {k}: {v:,.0f}×{mark}")
    path = write("vs_transformerlens", {
        "model": "smollm2-135m, K/V heads repeated (num_key_value_heads=9)", "n_tokens": T,
        "n_tl_edges": len(edges), "n_components": res.n_edges, "n_circuits": K, "ablation": "mean, per position",
        "ours_s_all_circuits": t_ours, "tl_faithfulness_s": tl_times, "tl_ablate_edges_s": kernel_times,
        "tl_circuits_timed": picks, "agreement": agree, "ratios": ratios,
        "wall_s": time.perf_counter() - t_start})
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
