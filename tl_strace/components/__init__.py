"""Head and MLP nodes: s-Trace and computation density at component granularity.

Researchers think in attention heads and MLPs. This module answers the s-Trace questions at that
level, in two ways:

1. **Projection of the token-level trace** (:func:`project_trace`): at each size of a token-level
   :class:`~tl_strace.results.StraceResult`, which heads and MLPs its subgraph uses and what share of
   each component's edges.
2. **A component graph searched directly** (:func:`component_strace`): the nodes are components,
   ``s`` = the fraction of components kept; components are ranked by a *scorer* and the strata
   (prefixes of the ranking, so nested by construction) are evaluated by masked forward passes.

Components and names
--------------------
A component is one attention head ``L{l}H{h}`` or one MLP ``MLP{l}``; with ``per_position=True``
it is split per token position, ``L{l}H{h}@{t}`` / ``MLP{l}@{t}`` (the component's contribution
to the residual stream at position ``t``). Names parse back (:func:`parse_component`). In the last
block only position ``T-1`` reaches the output, so per-position components of the last block exist
only there. Components are indexed layer-major, heads before the MLP, positions innermost.

Ablation, on TransformerLens hook points (hooks live only inside ``model.hooks``)
--------------------------------------------------------------------------------
* head ``h`` of block ``l``: ``blocks.{l}.attn.hook_z`` [batch, pos, head, d_head] is replaced by
  ``a + keep·(z − a)`` with ``keep`` per [batch, head] (or [batch, pos, head]). Since the attention
  output is ``Σ_h z_h @ W_O[h] + b_O``, the head's whole contribution ``z_h @ W_O[h]`` is removed
  (``a = 0``, zero ablation, the paper default) or replaced by its mean ``a = E[z_h] @ W_O[h]``
  (mean ablation). ``b_O`` stays: it is not a head's. In sandwich / post-norm blocks (Gemma 2/3,
  OLMo-2) the post-attention norm then acts on what is left, recomputed like everything downstream;
* MLP ``l``: ``blocks.{l}.hook_mlp_out`` is replaced the same way (its bias goes with it; under a
  post-MLP norm ``hook_mlp_out`` is that norm's output, what the block adds to the stream).
Residual connections are never removed: every component subgraph reaches the input.
Mean values come from a :class:`~tl_strace.mean.MeanCache`: position-agnostic by default (one mean
per head / MLP, any input length), per position with ``mean_positions="per_position"`` when the
reference covers the input's positions; ``config["mean_positions"]`` says which was used.

Scorers (:data:`COMPONENT_SCORERS`)
-----------------------------------
* ``"l1"`` (the papers' choice, lifted to components): the component's *local L1 weight* in the
  node it writes into, METHOD.md §2 applied to component vectors. At position ``t`` of block ``l``
  head ``h`` contributes ``c = (z_h[t] − a_h[t]) @ W_O[h]`` (what ablating it removes) and
  ``w = ‖c‖₁ / (‖resid_pre[t]‖₁ + Σ_h' ‖c_h'‖₁)``; the MLP contributes ``c = mlp_out[t] − a[t]``
  with ``w = ‖c‖₁ / (‖resid_mid[t]‖₁ + ‖c‖₁)`` (parallel blocks: heads and MLP write into one node,
  so both share ``‖resid_pre[t]‖₁ + Σ_h' ‖c_h'‖₁ + ‖c_mlp‖₁``). In the last block the vectors go through the
  final norm linearised at the clean run, as in the token-level graph; in sandwich / post-norm
  blocks a head's ``c`` also goes through the post-attention norm linearised at the clean run
  (:meth:`~tl_strace.model.CleanRun.attn_post_norm`). A whole component scores
  the mean of ``w`` over the positions that reach the output (all of them; in the last block only
  ``T-1``). No gradients; one clean forward.
* ``"attribution"`` (attribution patching, one forward + one backward): components are mixed with
  a continuous keep ``m`` (``a + m·(x − a)``, so ``m = 1`` is the model and ``m = 0`` the ablation),
  ``D(m) = KL(p_full ‖ p_m)`` at the last position, and component ``c`` scores
  ``−∂D/∂m_c = (ablated − x)·∂D/∂x`` at ``m = attribution_point`` for every component (default
  0.5). It is the first-order estimate of how much keeping ``c`` lowers the divergence, i.e. a
  one-step (midpoint-rule) version of integrated-gradients attribution patching (EAP-IG). The
  point cannot be 1: KL has zero gradient at the full model; at 0 only direct effects survive
  (every downstream component is ablated), so the midpoint is the default. Components are
  ranked by the score's magnitude, as EAP ranks edges (``weights`` keep the sign): far from the
  full model the sign of a first-order estimate is unreliable, and on SmolLM2 a component the
  model cannot lose (MLP29) can score strongly negative and would otherwise be ranked last.
* ``"greedy"`` (exact steps, the reference for small models): start from nothing; at each step
  add the component whose inclusion gives the lowest TV, by real masked forwards, every candidate
  of a step in one batched forward (ties: lowest index). Costs ``Σ_k (C − k)`` rows;
  ``greedy_steps`` stops it early (larger strata are then not evaluated, except the full model).
  Each step is optimal given the previous ones, so the first stratum is the best single component;
  later strata are not guaranteed optimal (greedy is myopic, and a scorer's prefix can beat it at
  some sizes). The unit tests compare every search with the exhaustive optimum on a tiny model.

Results are :class:`~tl_strace.results.ComponentResult` objects, the component sibling of the
token-level :class:`~tl_strace.results.StraceResult` over the same base
(:class:`~tl_strace.results.TraceResult`), so density, curves, ``to_dataframe()`` and
``save``/``load`` work the same: ``n_components`` and ``counts`` count components; ``sizes`` are
the σ you passed (stratum ``k`` keeps ``floor(σ_k·C)`` components, :func:`tl_strace.search.target_counts`)
or ``k/C``; ``labels``/``rank``/``scores`` are per component (``result.components`` names index
``i``): smallest stratum containing it, order of the search (-1 unranked), scorer value (greedy:
the TV drop when it was added; NaN unranked). ``reaches_input`` is always true (every residual
edge is kept). ``config["tv_empty"]`` is the TV with every component ablated (k = 0, off the log axis).
The *random* baseline at this granularity is a seeded uniform random order of the components
(``torch.randperm`` with ``seed``), its strata the same counts: any set of components is a valid
subgraph here, since the residual stream always connects them (at token level the random
baseline must instead be grown as a connected subgraph, :func:`tl_strace.search.random_strata`).
``subgraph()`` refuses component results; use :func:`component_table`.
Curves start at ``s = 1/C`` (not 1e-5), so component and token densities are not comparable
numbers; compare within a granularity.

>>> res = component_strace(model, "The capital of France is", scorer="l1")     # doctest: +SKIP
>>> res.density, component_table(res).head()                                      # doctest: +SKIP
>>> means = compute_means(model, reference_texts)                                 # doctest: +SKIP
>>> component_strace(model, text, scorer="greedy", ablation="mean", means=means)  # doctest: +SKIP
"""

# The package is split by job (space, ablate, scorers, trace, project); these names are its interface.
from tl_strace.components.space import (
    ABLATIONS,
    ComponentSpace,
    MAX_DEFAULT_STRATA,
    parse_component,
)
from tl_strace.components.ablate import (
    Ablation,
    _MixHook,
    component_logprobs,
)
from tl_strace.components.scorers import (
    COMPONENT_SCORERS,
    ComponentOptions,
)
from tl_strace.components.trace import (
    component_strace,
    evaluate_components,
)
from tl_strace.components.project import (
    component_table,
    project_trace,
)

__all__ = [
    "ABLATIONS",
    "ComponentOptions",
    "COMPONENT_SCORERS",
    "Ablation",
    "ComponentSpace",
    "component_logprobs",
    "component_strace",
    "component_table",
    "evaluate_components",
    "parse_component",
    "project_trace",
]
