"""Pictures of a result: an interactive circuit view, a standalone report, circuitsvis detail views
and static matplotlib figures. Views read results only; none of them needs the network.

>>> from tl_strace import views                                   # doctest: +SKIP
>>> views.circuit_view(res)                   # Jupyter: curves + interactive circuit   # doctest: +SKIP
>>> views.save_report(res, "report.html", model=model)            # doctest: +SKIP
>>> views.detail_views(res, model=model, s=1e-2)                  # doctest: +SKIP
>>> views.save_plots(res, "figures/austen")   # PNG + SVG         # doctest: +SKIP

``StraceResult`` delegates here: ``res`` displays itself in Jupyter, ``res.save_html(path)`` writes the
report, ``res.plot()`` / ``res.plot_shares()`` return figures.
"""

from tl_strace.views._data import ComponentStats, component_stats, edge_shares, token_contributions
from tl_strace.views._html import HTMLView
from tl_strace.views.circuit import circuit_view
from tl_strace.views.detail import attention_patterns, colored_tokens, detail_views, topk_tokens
from tl_strace.views.plots import plot_curves, plot_shares, save_plots
from tl_strace.views.report import report_html, save_report

__all__ = [
    "ComponentStats",
    "HTMLView",
    "attention_patterns",
    "circuit_view",
    "colored_tokens",
    "component_stats",
    "detail_views",
    "edge_shares",
    "plot_curves",
    "plot_shares",
    "report_html",
    "save_plots",
    "save_report",
    "token_contributions",
    "topk_tokens",
]
