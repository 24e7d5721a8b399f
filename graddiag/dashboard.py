"""TensorBoard's custom-scalars dashboard for graddiag runs, built from the tag scheme (`tags`).

`custom_scalars_layout(written)` groups the charts (global values, per-layer norms, clipping,
findings) and keeps only the charts of statistics the run has written, so no chart stays empty
("Matches (0)"). `TensorBoardSink` writes the layout of `ALWAYS_WRITTEN` when the run starts and
writes it again, at the current step, whenever a step writes a statistic for the first time
(TensorBoard shows a run's latest layout). Every chart selects its tags with `tags.tag_regex`, so
a change of the scheme cannot leave a chart empty either.

What a layout cannot set: TensorBoard colours the lines of a chart by run, not by tag, and its
"ignore outliers" and log-scale toggles belong to the viewer; the per-layer view that tells layers
apart, on a log scale, is the Gradients tab (`graddiag.tensorboard_plugin`).
"""

from __future__ import annotations

from collections.abc import Collection

from graddiag import tags

__all__ = ["ALWAYS_WRITTEN", "CHARTS", "custom_scalars_layout"]

#: ``(stat, per_layer)`` pairs every graddiag run writes from its first step on.
ALWAYS_WRITTEN = frozenset(
    {("grad_norm", False), ("nonfinite", False), ("findings", False), ("grad_norm", True)}
)

#: ``(category, [(chart title, [(stat, per_layer), ...]), ...])``, in display order.
CHARTS: tuple[tuple[str, tuple[tuple[str, tuple[tuple[str, bool], ...]], ...]], ...] = (
    (
        "graddiag: global",
        (
            ("global gradient norm (pre-clip)", (("grad_norm", False),)),
            ("layers with NaN/Inf gradients", (("nonfinite", False),)),
            ("loss", (("loss", False),)),
        ),
    ),
    (
        "graddiag: per-layer gradient norms",
        (
            ("gradient norm per layer (log scale: the chart's log toggle)", (("grad_norm", True),)),
            ("max |g| per layer", (("grad_max", True),)),
            ("update / weight ratio per layer", (("update_ratio", True),)),
        ),
    ),
    (
        "graddiag: clipping",
        (
            ("global clip coefficient", (("clip_coef", False),)),
            ("per-layer clip coefficient", (("clip_coef", True),)),
        ),
    ),
    (
        "graddiag: findings",
        (
            ("new findings per step", (("findings", False),)),
            (
                "gradients reset / backward calls",
                (("grad_reset", False), ("backward_calls", False)),
            ),
        ),
    ),
)


def custom_scalars_layout(written: Collection[tuple[str, bool]] | None = None):
    """The dashboard grouping as a `tensorboard.plugins.custom_scalar.layout_pb2.Layout`.

    Args:
        written: the ``(stat, per_layer)`` pairs the run has written; charts of other statistics,
            and categories left without a chart, are left out. None: every chart.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2 as lp

    def keep(series) -> bool:
        return written is None or any(s in written for s in series)

    categories = []
    for title, charts in CHARTS:
        kept = [
            lp.Chart(
                title=chart,
                multiline=lp.MultilineChartContent(
                    tag=[tags.tag_regex(stat, per_layer) for stat, per_layer in series]
                ),
            )
            for chart, series in charts
            if keep(series)
        ]
        if kept:
            categories.append(lp.Category(title=title, chart=kept))
    return lp.Layout(category=categories)
