# %% [markdown]
# # 5 · Scaling up: GPUs, memory budgets, many processes, resuming
#
# **What you will learn**
#
# * how a `strace` call spends its time, and how the memory budget trades memory for speed;
# * running on a GPU, and which precision to use;
# * corpus runs from the command line that survive a crash and resume without losing or duplicating
#   a passage;
# * sharding a corpus over several processes with `torchrun`, and reading the results back.
#
# Runs offline on a CPU in a few minutes; the GPU cells adapt to what is there.

# %% [markdown]
# ## 1. Where the time goes
#
# One call is one clean forward pass (to build the graph), the search, and the masked forward passes:
# one row per stratum and condition, run as batches. The result records its own timings:

# %%
import torch

import tl_strace as ts

model = ts.load_model("smollm2-135m")
text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a"
res = ts.strace(model, text, conditions=["only"])
{k: round(v, 3) for k, v in res.timings.items()}

# %% [markdown]
# `evaluate` dominates: the graph and the search are cheap, and 27 masked forwards batched together
# cost about as much as a plain forward of 27 copies (`BENCHMARKS.md` has the measured ratios).
#
# ## 2. The memory budget
#
# A call holds three things: the edge space (weights, search order and strata labels: about 40 bytes
# per slot, `layers × heads × tokens²` slots), the clean run's activations, and the masked forwards'
# rows (one copy of the forward pass each; attention patterns grow with the square of the input
# length). `tl_strace.memory.estimate_memory` gives the upper bound before anything runs:

# %%
from tl_strace.memory import estimate_memory
from tl_strace.model import describe_model

spec = describe_model(model)
T = len(res.str_tokens)
for n in (T, 512):
    print(f"{n:>4} tokens:", estimate_memory(spec, n, rows=27).describe())

# %% [markdown]
# `memory_budget` (bytes) bounds the whole call by that estimate: the masked forwards get as many
# rows as fit beside the fixed part, and a budget the input cannot fit is refused up front, saying
# how much it needs, instead of running out of memory half-way. `batch_size` sets the rows directly.
# Results do not depend on either:

# %%
est = estimate_memory(spec, T, rows=0)
tight = est.fixed + 4 * est.per_row  # room for 4 rows per forward
small = ts.strace(model, text, conditions=["only"], memory_budget=tight)
print(f"same numbers with a {tight / 2**20:.0f} MiB budget:", torch.allclose(small.tv, res.tv, atol=1e-5),
      f"({small.timings['evaluate']:.2f} s vs {res.timings['evaluate']:.2f} s to evaluate)")
try:
    ts.strace(model, text, memory_budget=64 * 2**20)
except ts.InputError as e:
    print("InputError:", e)

# %% [markdown]
# ## 3. On a GPU
#
# Pass `device` (and usually a half-precision `dtype`) to `load_model`, or move your own model. The
# search runs on the CPU (it is cheap); forward passes run where the model is; metrics are computed in
# float32 whatever the model's precision. On a GPU, bfloat16 is the sensible default; on a CPU keep
# float32 (half precision is slow there). Where the sum-of-edges identities only hold to a looser
# tolerance in half precision, tl_strace uses one, and refuses the model if even that fails.

# %%
if torch.cuda.is_available():
    gpu_model = ts.load_model("smollm2-135m", device="cuda", dtype=torch.bfloat16)
    gpu_res = ts.strace(gpu_model, text, conditions=["only"])
    print("GPU:", {k: round(v, 3) for k, v in gpu_res.timings.items()}, "density", round(gpu_res.density, 3))
else:
    print("No GPU here; on one, use ts.load_model(name, device='cuda', dtype=torch.bfloat16).")

# %% [markdown]
# ## 4. Corpus runs that survive a crash
#
# `tl-strace run` (or `tl_strace.corpus.run_corpus`) traces every passage of a data set and appends
# each result to a shard file as soon as it is done, with the run's configuration and library
# versions stored beside it. Killed at any point — even with `kill -9` — the same command continues
# where it stopped; a half-written last record is detected and redone. Here we trace 3 passages, then
# ask for 5: the second call only traces the 2 new ones.

# %%
import subprocess
import sys
import tempfile
from pathlib import Path

work = Path(tempfile.mkdtemp())
cli = [sys.executable, "-m", "tl_strace.cli"]
for limit in (3, 5):
    out = subprocess.run(cli + ["run", "--model", "smollm2-135m", "--data", "austen-10", "--out", str(work / "run"),
                                "--limit", str(limit)], capture_output=True, text=True)
    print(out.stdout.strip() or out.stderr.strip()[-500:])
sorted(p.name for p in (work / "run").iterdir())

# %% [markdown]
# Pointing a *different* configuration at the same directory is refused, so two runs can never be
# mixed in one table:

# %%
out = subprocess.run(cli + ["run", "--model", "smollm2-135m", "--data", "austen-10", "--out", str(work / "run"),
                            "--limit", "5", "--weights", "ifr"], capture_output=True, text=True)
print(out.returncode, out.stderr.strip()[-400:])

# %% [markdown]
# ## 5. Many processes with torchrun
#
# On a machine with several GPUs (or just several cores), `torchrun` starts one process per device;
# each takes every n-th passage, loads the model on its own GPU (`LOCAL_RANK`), and writes its own
# shard. Readers treat the shards as one table. Two CPU processes here:

# %%
out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "tl_strace.cli", "run", "--model", "smollm2-135m", "--data", "austen-10",
                      "--out", str(work / "sharded"), "--limit", "4"], capture_output=True, text=True)
print(out.returncode, out.stdout.strip()[-600:])
sorted(p.name for p in (work / "sharded").iterdir())

# %% [markdown]
# ## 6. Reading results
#
# `load_run` reads a run directory — every shard, in data order — into a table with one row per
# passage: scalar columns (density, entropy, recovery sizes, ...) and per-stratum list columns (the
# TV curve, shares of edge types). Passages that could not be traced are listed with their reason,
# never silently dropped.

# %%
from tl_strace.corpus import load_run

run = load_run(work / "sharded")
print(run)
run.table[["id", "density", "full_entropy", "recovery_1", "n_tokens"]]

# %% [markdown]
# `tl-strace report DIR [DIR ...]` writes a self-contained HTML page with every analysis of
# tutorial 4 for one or more runs.

# %%
out = subprocess.run(cli + ["report", str(work / "run"), str(work / "sharded"), "--out", str(work / "report")],
                     capture_output=True, text=True)
print(out.returncode, out.stdout.strip()[-300:], out.stderr.strip()[-300:])
