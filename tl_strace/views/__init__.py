"""Pictures of a result: an interactive circuit view, a standalone report, circuitsvis detail views
and static matplotlib figures. Views read results only; none of them needs the network.

>>> from tl_strace import views                                   # doctest: +SKIP
>>> views.circuit_view(res)                   # Jupyter: curves + interactive circuit   # doctest: +SKIP
>>> views.save_report(res, "report.html", patterns=res.clean_patterns(model))   # doctest: +SKIP
>>> views.detail_views(res, 1e-2, patterns=res.clean_patterns(model))           # doctest: +SKIP
>>> views.save_plots(res, "figures/austen")   # PNG + SVG         # doctest: +SKIP

``StraceResult`` delegates here: ``res`` displays itself in Jupyter, ``res.save_html(path)`` writes the
report, ``res.plot()`` / ``res.plot_shares()`` return figures: importing this package registers the
renderers behind those methods (:func:`tl_strace.results.register_view`), so results never import
views. Views never run the model: what they draw from it (attention patterns) is passed in.
"""

from tl_strace.results import register_view
from tl_strace.views._data import ComponentStats, component_stats, edge_shares, token_contributions
from tl_strace.views._html import HTMLView
from tl_strace.views.circuit import circuit_view
from tl_strace.views.detail import attention_patterns, colored_tokens, detail_views, topk_tokens
from tl_strace.views.plots import plot_curves, plot_shares, save_plots
from tl_strace.views.profile import interactive_html, plot_profile, profile_figure, profile_view, save_profile_html
from tl_strace.views.report import report_html, save_report

register_view("html", lambda res: circuit_view(res).html)
register_view("report", save_report)
register_view("details", detail_views)
register_view("plot", plot_curves)
register_view("plot_shares", plot_shares)
register_view("profile_html", lambda prof: profile_view(prof).html)
register_view("profile_save", save_profile_html)
register_view("profile_plot", plot_profile)

__all__ = [
    "ComponentStats",
    "HTMLView",
    "attention_patterns",
    "circuit_view",
    "colored_tokens",
    "component_stats",
    "detail_views",
    "edge_shares",
    "interactive_html",
    "plot_curves",
    "plot_profile",
    "plot_shares",
    "profile_figure",
    "profile_view",
    "report_html",
    "save_plots",
    "save_profile_html",
    "save_report",
    "token_contributions",
    "topk_tokens",
]
