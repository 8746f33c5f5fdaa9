"""The papers' corpus analyses (METHOD.md §7) over runs recorded by :mod:`tl_strace.corpus`.

Every analysis is a function from one or more :class:`~tl_strace.corpus.CorpusRun` (or run
directories) to a :class:`pandas.DataFrame`; ``plot_*`` functions draw them on a new
:class:`matplotlib.figure.Figure` (no pyplot, no global style or backend change). Nothing here
runs a model: the runs hold every number needed.

>>> from tl_strace.corpus import load_run                      # doctest: +SKIP
>>> run = load_run("runs/smol")                                # doctest: +SKIP
>>> entropy_density(run)                                       # doctest: +SKIP
             run    n       rho         p
0  smollm2-135m  200  0.41  1.2e-09
>>> edge_shares(run).query("size in (0.001, 0.1)")             # doctest: +SKIP

The statistics are SciPy's: Spearman's rho (``scipy.stats.spearmanr``: ranks with ties averaged,
two-sided p from the t approximation with n-2 degrees of freedom), the exact sign test
(``binomtest``) and t p-values; they were hand-written here before 0.2 and gave the same numbers.
"""


from tl_strace.analysis._base import (
    BOUNDARY,
    MINIMAL_CORE,
)
from tl_strace.analysis.stats import (
    sign_test,
    spearman,
    t_pvalue,
)
from tl_strace.analysis.tables import (
    attention_ablation_comparison,
    component_frequency,
    cross_model_density,
    density_along_text,
    density_distribution,
    density_vs_context,
    density_vs_frequency,
    edge_shares,
    entropy_density,
    interpolated_curves,
    lorenz_curves,
    mean_curve,
    unigram_frequency,
)
from tl_strace.analysis.plots import (
    plot_attention_ablation,
    plot_cross_model,
    plot_density_along_text,
    plot_density_distribution,
    plot_density_vs_context,
    plot_edge_shares,
    plot_entropy_density,
    plot_interpolated_curves,
    plot_lorenz,
    plot_tv_curves,
    plot_unigram,
)
from tl_strace.analysis.findings import (
    findings_markdown,
    findings_table,
    phases_table,
    update_findings_file,
)
from tl_strace.analysis.report import (
    build_report,
    write_report,
)

__all__ = [
    "BOUNDARY",
    "MINIMAL_CORE",
    "attention_ablation_comparison",
    "build_report",
    "component_frequency",
    "cross_model_density",
    "density_along_text",
    "density_distribution",
    "density_vs_context",
    "density_vs_frequency",
    "edge_shares",
    "entropy_density",
    "findings_markdown",
    "findings_table",
    "interpolated_curves",
    "lorenz_curves",
    "mean_curve",
    "plot_attention_ablation",
    "plot_cross_model",
    "plot_density_along_text",
    "plot_density_distribution",
    "plot_density_vs_context",
    "plot_edge_shares",
    "plot_entropy_density",
    "plot_interpolated_curves",
    "plot_lorenz",
    "plot_tv_curves",
    "plot_unigram",
    "phases_table",
    "sign_test",
    "spearman",
    "t_pvalue",
    "unigram_frequency",
    "update_findings_file",
    "write_report",
]
