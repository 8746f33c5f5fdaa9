# %% [markdown]
# # 3 · Heads and MLPs
#
# **What you will learn**
#
# * two ways to get component-level answers: projecting the token-level trace onto heads and MLPs,
#   and searching a graph of components directly;
# * the three component scorers — L1 contribution (the papers' choice), attribution patching, and an
#   exact greedy search — and how far the cheap ones are from the exact one;
# * zero versus mean ablation, with means computed once from a reference corpus and saved;
# * circuitsvis views of the attention heads in the sparse core.
#
# Runs offline on a CPU in a few minutes on SmolLM2-135M (30 blocks × 9 heads + 30 MLPs = 300
# components).

# %%
import pandas as pd

import tl_strace as ts

pd.set_option("display.width", 140)
model = ts.load_model("smollm2-135m")
text = "Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that his wife never understood his"

# %% [markdown]
# ## 1. Projecting the token-level trace
#
# A token-level trace keeps individual edges: "head L3H7 moves token 5 into token 9". `project_trace`
# counts, at every size, which heads and MLPs those edges belong to and what share of each
# component's edges the trace holds. Residual edges belong to no component.

# %%
res = ts.strace(model, text, conditions=["only"])
proj = ts.project_trace(res)
core = proj[(proj["size"] == 1e-3) & proj["used"]]
print(f"s = 1e-3 uses {len(core)} components:", ", ".join(core.sort_values("weight", ascending=False)["component"][:12]))
core.sort_values("weight", ascending=False).head(8)[["component", "n_edges", "n_edges_total", "share", "weight"]]

# %% [markdown]
# Every MLP of the last position's residual chain shows up early (an MLP node has only two in-edges,
# so its MLP edge carries a large local weight); heads join with a few of their many token-level
# edges. The `share` column says how partially a head is used.
#
# ## 2. Searching components directly
#
# `component_strace` treats each head and MLP as one node: size s is the fraction of the 300
# components kept, the ranking comes from a scorer, and each stratum is evaluated by a masked
# forward on the components' hook points (`attn.hook_z` per head, `hook_mlp_out`). The result is a
# `ComponentResult`, the component-level sibling of the token-level `StraceResult` over the same
# base (`TraceResult`): density, `to_dataframe()`, save/load and the views work the same, and its
# own fields say what they count (`n_components`, per-component `labels`, `rank` and `scores`).

# %%
SIZES = [k / 300 for k in (1, 2, 3, 5, 10, 20, 30, 60, 100, 150, 200, 250)]  # k components of 300
l1 = ts.component_strace(model, text, scorer="l1", sizes=SIZES)
print(l1)
from tl_strace.components import component_table

component_table(l1).head(10)[["name", "kind", "rank", "score", "first_size"]]

# %% [markdown]
# ## 3. Three scorers
#
# * `"l1"` — each component's L1 contribution to the residual stream (the papers' criterion), no
#   extra forward;
# * `"attribution"` — attribution patching: one forward and one backward give (ablated − clean) ·
#   gradient of the output divergence for every component at once;
# * `"greedy"` — the exact reference: at each step, add the component whose inclusion gives the lowest
#   TV, measured by real masked forwards (all candidates of a step in one batch). Each step costs a
#   forward of up to 300 copies of the input, so here we run it on a short prompt and stop it after
#   four steps: the sparse end is where scorers differ most.

# %%
import time

short = "The capital of France is"
first = [k / 300 for k in (1, 2, 3, 4)]
curves = {}
for scorer, kw in [("l1", {}), ("attribution", {}), ("greedy", {"greedy_steps": 4})]:
    t = time.perf_counter()
    r = ts.component_strace(model, short, scorer=scorer, sizes=first, **kw)
    curves[scorer] = pd.Series(r.tv.numpy(), index=(r.sizes.numpy() * 300).round().astype(int))
    print(f"{scorer:12} {time.perf_counter() - t:5.1f} s")
pd.DataFrame(curves).rename_axis("components kept").round(3)

# %% [markdown]
# The greedy search picks, at each step, the best next component given those already kept, so it is
# the reference the cheap scorers are measured against (the test suite checks on a tiny model that it
# is never worse at any size); the table shows by how much TV the cheap scorers trail it here. (On this small model even the best handful of components leaves TV high:
# the prediction needs much of the network, as tutorial 1 found at token level.)
#
# ## 4. Zero versus mean ablation
#
# Zero ablation (the papers' default) replaces a removed component's output by 0; mean ablation
# replaces it by its average over a reference corpus, which keeps the stream at a typical scale.
# Means are computed once — here over 24 of the shipped Austen passages — and saved with
# safetensors, so the next run loads them. The default is position-agnostic (one mean per component),
# which works for inputs of any length.

# %%
import tempfile
from pathlib import Path

from tl_strace.io.datasets import load_passages

reference = [p.text for p in load_passages("austen-20")][:24]
means_path = Path(tempfile.mkdtemp()) / "smollm2_means.safetensors"
means = ts.compute_means(model, reference, path=means_path)
zero = l1
mean = ts.component_strace(model, text, scorer="l1", ablation="mean", means=means_path, sizes=SIZES)
pd.DataFrame({"zero": zero.tv.numpy(), "mean": mean.tv.numpy()},
             index=(zero.sizes.numpy() * 300).round().astype(int)).rename_axis("components kept").round(3)

# %% [markdown]
# Mean ablation typically keeps the output closer to the full model at small sizes: removed
# components still contribute their average, so what is measured is the *input-specific* part of the
# computation. Which one to use depends on the question; the papers use zero.
#
# ## 5. Looking at the heads of the sparse core
#
# The circuitsvis views render offline. `attention_patterns` shows the attention of the heads in a
# token-level subgraph, restricted to the edges the trace keeps. Views never run the model: the
# clean attention patterns come from `res.clean_patterns(model)` (one forward pass) and are passed in.

# %%
from tl_strace.views import attention_patterns

attention_patterns(res, res.clean_patterns(model), 1e-2)

# %% [markdown]
# **Next:** tutorial 4 runs density over a corpus and reproduces the papers' analyses.
