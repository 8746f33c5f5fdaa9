"""Component-level s-Trace on SmolLM2-135M: the measurements for the issue note (issue 3).

For each of 20 short English passages (written for this script) and each ablation (zero; mean
over a separate 30-sentence reference corpus, position-agnostic), it runs
:func:`tl_strace.components.component_strace` with the ``l1`` and ``attribution`` scorers over
every size up to 30 components and a geometric grid beyond (SmolLM2 has 30 blocks × (9 heads + 1
MLP) = 300 components), and the exact ``greedy`` search on the first ``--greedy-passages``
passages for its first ``--greedy-steps`` components only (each greedy step is one batched
forward of up to 300 rows: the whole search would be ~45,000 rows per passage, hours on 2 CPU
cores). It also projects the token-level s-Trace of the first ``--token-passages`` passages onto
components (way 1).

It writes ``results.jsonl`` (one JSON object per run, appended as they finish, so a restart
resumes) and ``summary.md`` (the tables for the note) under ``--out``.

    nohup python benchmarks/components_smollm2.py --out /tmp/comp_bench > /tmp/comp_bench.log 2>&1 &
    python benchmarks/components_smollm2.py --out /tmp/comp_bench --summary-only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PASSAGES = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp, and the ships",
    "When the rain finally stopped, the children ran outside to play in the",
    "She opened the letter slowly, afraid of what it might say about her",
    "The recipe calls for two cups of flour, one cup of sugar, and three",
    "After years of research, the scientists finally published their results in a leading",
    "The train to the city leaves at seven in the morning, so we will have to wake up",
    "He planted tomatoes, beans and carrots in the small garden behind his",
    "The museum was closed on Mondays, so the tourists decided to visit the",
    "In the winter the lake freezes over, and the people of the village go skating on the",
    "My grandmother always told me that the secret to a good soup is to cook it",
    "The capital of France is Paris, and the capital of Italy is",
    "The committee will meet again next week to discuss the budget for the coming",
    "She played the piano every day for hours, hoping one day to perform in a",
    "The dog barked loudly at the mailman, who quickly dropped the letters and",
    "Water boils at one hundred degrees Celsius at sea level, but at higher altitudes it boils at a",
    "They walked along the beach at sunset, watching the waves roll onto the",
    "The library lends books for three weeks, after which readers must either return them or",
    "The farmer woke before dawn to milk the cows and feed the",
    "On the first day of school, the teacher asked each student to write their",
    "The bridge was built more than a hundred years ago and is still used by thousands of",
]
"""20 evaluation passages (written for this benchmark; no external text)."""

REFERENCE = [
    "The weather was mild for the time of year, and most people spent the afternoon outdoors.",
    "A small bakery on the corner sells fresh bread every morning.",
    "The students listened carefully while the professor explained the theory.",
    "Several new houses have been built along the river in the last few years.",
    "He forgot his umbrella at the station and got wet on the way home.",
    "The company announced that it would open a new office in the spring.",
    "Our neighbours keep chickens, and sometimes they give us eggs.",
    "The concert started late because the lead singer was stuck in traffic.",
    "Most of the forest was protected after the fire twenty years ago.",
    "She wrote a short note and left it on the kitchen table.",
    "The children built a snowman and gave it a carrot for a nose.",
    "It took the engineers three months to repair the damaged road.",
    "The town holds a market in the square every Saturday morning.",
    "He read the newspaper while waiting for his coffee to cool.",
    "The mountains were covered in snow until the end of April.",
    "The hospital hired more nurses to cope with the busy winter season.",
    "A cat was sleeping in the sun on the warm stone wall.",
    "They painted the fence white and planted roses along it.",
    "The meeting was postponed because the manager was ill.",
    "Many birds fly south for the winter and return in the spring.",
    "The shop assistant helped him find a shirt in the right size.",
    "The river flooded the fields after a week of heavy rain.",
    "We stayed at a small hotel near the harbour for three nights.",
    "The museum has a large collection of old maps and clocks.",
    "Her brother works as a carpenter and makes tables and chairs.",
    "The bus was full, so we decided to walk to the park instead.",
    "The old castle on the hill is now a popular place for tourists.",
    "At night the city lights can be seen from many miles away.",
    "The baker rose early to prepare the dough for the day.",
    "The team practised every evening before the final match.",
]
"""30 reference sentences for the mean-ablation cache, disjoint from the evaluation passages."""

DENSE_COUNTS = list(range(1, 31))
SPARSE_CORE = (5, 10)


def _counts(C: int) -> list[int]:
    grid = {int(round(x)) for x in np.geomspace(30, C, 16)}
    return sorted(set(DENSE_COUNTS) | grid | {C})


def _done(path: Path) -> set[tuple]:
    keys = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                keys.add((r["kind"], r["passage"], r.get("scorer"), r.get("ablation")))
    return keys


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    import tl_strace as ts
    from tl_strace.components import component_strace, component_table, project_trace
    from tl_strace.mean import compute_means

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = _done(log)
    model = ts.load_model("smollm2-135m")
    t0 = time.perf_counter()
    means = compute_means(model, REFERENCE, path=out / "smollm2_means.safetensors")
    t_means = time.perf_counter() - t0
    print(f"means: {means.n_sequences} sequences, {means.n_tokens} tokens, {t_means:.1f} s", flush=True)
    C = 30 * 10
    sizes = [k / C for k in _counts(C)]

    def record(row: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")

    jobs = []
    for i in range(len(PASSAGES)):
        for abl in ("zero", "mean"):
            for sc in ("l1", "attribution"):
                if sc in args.scorers:
                    jobs.append(("component", i, sc, abl))
    for i in range(args.greedy_from, min(args.greedy_passages, len(PASSAGES)) if "greedy" in args.scorers else 0):
        for abl in ("zero", "mean"):
            jobs.append(("component", i, "greedy", abl))
    for i in range(min(args.token_passages, len(PASSAGES))):
        jobs.append(("token", i, None, None))
    for kind, i, sc, abl in jobs:
        if (kind, i, sc, abl) in done:
            continue
        text = PASSAGES[i]
        if kind == "token":
            res = ts.strace(model, text, conditions=("only",))
            proj = project_trace(res)
            used = {}
            for s in (1e-3, 1e-2, 0.1, 0.4):
                k = int(np.argmin(np.abs(np.log(res.sizes.numpy()) - np.log(s))))
                g = proj[(proj["stratum"] == k) & proj["used"]].sort_values("share", ascending=False)
                used[str(s)] = g[["component", "share"]].values.tolist()
            record({"kind": "token", "passage": i, "sizes": res.sizes.tolist(), "tv": res.tv.tolist(),
                    "time": res.timings["total"], "used": used})
        else:
            kw = {"ablation": abl, "means": means if abl == "mean" else None}
            if sc == "greedy":
                kw["greedy_steps"] = args.greedy_steps
            res = component_strace(model, text, scorer=sc, sizes=sizes, **kw)
            tab = component_table(res)
            record({"kind": "component", "passage": i, "scorer": sc, "ablation": abl,
                    "counts": res.counts.tolist(), "tv": res.tv.tolist(), "nucleus": res.nucleus.tolist(),
                    "density": res.density, "tv_empty": res.config["tv_empty"], "timings": res.timings,
                    "order": tab[tab["rank"] >= 0]["name"].tolist()[:50], "n_tokens": len(res.str_tokens),
                    "full_top": res.full_top_strs[0]})
        print(f"{kind} {i} {sc} {abl} done at {time.perf_counter() - t0:.0f} s", flush=True)
    summarize(out, t_means)


def _fmt(x: float) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _groups(comp: list[dict], scorers: tuple[str, ...] = ("l1", "attribution", "greedy")):
    """(ablation, scorer, runs) for every pair that has runs, in table order."""
    for abl in ("zero", "mean"):
        for sc in scorers:
            rs = [r for r in comp if r["scorer"] == sc and r["ablation"] == abl]
            if rs:
                yield abl, sc, rs


def summarize(out: Path, t_means: float | None = None) -> None:
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    comp = [r for r in rows if r["kind"] == "component"]
    md = ["# Component-level s-Trace on SmolLM2-135M-Instruct (Q4_1 GGUF, fp32, CPU, 1 thread)", ""]
    n_pass = len({r["passage"] for r in comp})
    ntok = [r["n_tokens"] for r in comp]
    md.append(f"{n_pass} passages ({min(ntok)}–{max(ntok)} tokens incl. BOS); 300 components (30 blocks × 9 heads + "
              "30 MLPs); mean ablation: position-agnostic means over 30 reference sentences."
              + (f" Mean cache computed in {t_means:.1f} s." if t_means else ""))
    md.append("")
    # TV at selected counts
    ks = [1, 2, 3, 5, 10, 15, 20, 30, 55, 102, 162, 221, 257, 300]
    md.append("## Mean TV (over passages) vs number of components kept k (s = k/300)")
    md.append("")
    md.append("| ablation | scorer | passages | TV(k=0) | " + " | ".join(f"k={k}" for k in ks)
              + " | density (AUC log s) | median k: top token recovered | median k: TV ≤ 0.5 |")
    md.append("|---|---|---|---|" + "---|" * len(ks) + "---|---|---|")
    for abl, sc, rs in _groups(comp):
        cells = []
        for k in ks:
            vals = [r["tv"][r["counts"].index(k)] for r in rs if k in r["counts"]]
            cells.append(_fmt(float(np.mean(vals))) if vals else "—")
        dens = _fmt(float(np.mean([r["density"] for r in rs]))) if sc != "greedy" else "— (partial)"
        k_top = [next((k for k, n in zip(r["counts"], r["nucleus"]) if n >= 1), np.nan) for r in rs]
        k_tv = [next((k for k, t in zip(r["counts"], r["tv"]) if t <= 0.5), np.nan) for r in rs]
        med = lambda v: "—" if sc == "greedy" else f"{np.median(v):.0f}"  # noqa: E731
        md.append(f"| {abl} | {sc} | {len(rs)} | {_fmt(float(np.mean([r['tv_empty'] for r in rs])))} | "
                  + " | ".join(cells) + f" | {dens} | {med(k_top)} | {med(k_tv)} |")
    md.append("")
    # Greedy vs cheap scorers on the same passages
    md.append("## Cheap scorers vs the greedy reference (same passages, k ≤ greedy steps)")
    md.append("")
    md.append("| ablation | scorer | mean TV − greedy TV | share of (passage, k) where scorer < greedy | max TV − greedy |")
    md.append("|---|---|---|---|---|")
    for abl in ("zero", "mean"):
        gr = {r["passage"]: r for r in comp if r["scorer"] == "greedy" and r["ablation"] == abl}
        for sc in ("l1", "attribution"):
            diffs = []
            for r in comp:
                if r["scorer"] == sc and r["ablation"] == abl and r["passage"] in gr:
                    g = gr[r["passage"]]
                    for k, tvg in zip(g["counts"][:-1], g["tv"][:-1]):
                        diffs.append(r["tv"][r["counts"].index(k)] - tvg)
            if diffs:
                d = np.array(diffs)
                md.append(f"| {abl} | {sc} | {d.mean():+.3f} | {(d < -1e-6).mean():.2f} | {d.max():+.3f} |")
    md.append("")
    # Timings
    md.append("## Time per passage (s, 1 CPU thread on a shared 2-core machine)")
    md.append("")
    md.append("| ablation | scorer | strata evaluated | search (mean) | evaluate strata (mean) | total (mean) |")
    md.append("|---|---|---|---|---|---|")
    for abl, sc, rs in _groups(comp):
        t = {k: np.mean([r["timings"][k] for r in rs]) for k in ("search", "evaluate", "total")}
        md.append(f"| {abl} | {sc} | {len(rs[0]['counts'])} | {t['search']:.1f} | {t['evaluate']:.1f} | "
                  f"{t['total']:.1f} |")
    md.append("")
    # Sparse core
    for n in SPARSE_CORE:
        md.append(f"## Sparse core: components most often among the first {n} kept")
        md.append("")
        md.append("| ablation | scorer | passages | most frequent (count) |")
        md.append("|---|---|---|---|")
        for abl, sc, rs in _groups(comp):
            if all(len(r["order"]) >= n for r in rs):
                cnt = Counter(c for r in rs for c in r["order"][:n])
                top = ", ".join(f"{c} ({v})" for c, v in cnt.most_common(10))
                md.append(f"| {abl} | {sc} | {len(rs)} | {top} |")
        md.append("")
    tok = [r for r in rows if r["kind"] == "token"]
    if tok:
        md.append("## Way 1: components used by the token-level s-Trace (projection)")
        md.append("")
        md.append("| size s | mean TV | passages | components used (mean #) | mean share of a used component's edges "
                  "| most often used (count) |")
        md.append("|---|---|---|---|---|---|")
        for s in ("0.001", "0.01", "0.1", "0.4"):
            used = [r["used"].get(s, []) for r in tok]
            shares = [sh for u in used for _, sh in u]
            tv = [r["tv"][int(np.argmin(np.abs(np.log(r["sizes"]) - np.log(float(s)))))] for r in tok]
            cnt = Counter(c for u in used for c, _ in u)
            md.append(f"| {s} | {np.mean(tv):.3f} | {len(tok)} | {np.mean([len(u) for u in used]):.1f} | "
                      f"{np.mean(shares) if shares else 0:.3f} | "
                      + ", ".join(f"{c} ({v})" for c, v in cnt.most_common(8)) + " |")
        md.append("")
    (out / "summary.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="components_smollm2_out")
    ap.add_argument("--greedy-passages", type=int, default=5)
    ap.add_argument("--greedy-steps", type=int, default=12)
    ap.add_argument("--greedy-from", type=int, default=0, help="first passage of the greedy runs (to split them "
                    "over processes)")
    ap.add_argument("--token-passages", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scorers", nargs="+", default=["l1", "attribution", "greedy"],
                    help="which component scorers to run (default: all three)")
    ap.add_argument("--summary-only", action="store_true")
    a = ap.parse_args()
    if a.summary_only:
        summarize(Path(a.out))
    else:
        run(a)
