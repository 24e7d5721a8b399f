"""TensorBoard's custom-scalars dashboard for graddiag runs, built from the tag scheme (`tags`).

`custom_scalars_layout()` groups the charts (global values, per-layer norms, clipping, findings);
`TensorBoardSink` writes it once per run. Every chart selects its tags with `tags.tag_regex`, so a
change of the scheme cannot leave a chart empty.
"""

from __future__ import annotations

from graddiag import tags

__all__ = ["CHARTS", "custom_scalars_layout"]

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
            ("gradient norm per layer", (("grad_norm", True),)),
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


def custom_scalars_layout():
    """The dashboard grouping as a `tensorboard.plugins.custom_scalar.layout_pb2.Layout`."""
    from tensorboard.plugins.custom_scalar import layout_pb2 as lp

    return lp.Layout(
        category=[
            lp.Category(
                title=title,
                chart=[
                    lp.Chart(
                        title=chart,
                        multiline=lp.MultilineChartContent(
                            tag=[tags.tag_regex(stat, per_layer) for stat, per_layer in series]
                        ),
                    )
                    for chart, series in charts
                ],
            )
            for title, charts in CHARTS
        ]
    )
