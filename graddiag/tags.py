"""The one TensorBoard tag scheme graddiag writes and reads (and the regexes that select its tags).

Layer statistics live under ``graddiag/<stat>/<layer>`` (``graddiag/grad_norm/encoder.0.linear1``),
whole-model values under ``graddiag/global/<stat>``, gradient histograms under
``graddiag/hist/<layer>``, findings (markdown text) under ``graddiag/findings`` and the run's static
description (layers, frozen parameters, detector settings; JSON text) under ``graddiag/model``.
"""

from __future__ import annotations

import re

PREFIX = "graddiag"
GLOBAL = "global"

#: Per-layer statistics (`graddiag/<stat>/<layer>`).
LAYER_STATS = (
    "grad_norm",  # L2 norm of the layer's gradients, before clipping
    "grad_max",  # max |g|
    "nonfinite",  # 1 where the layer's gradient holds NaN/Inf (written only when it does)
    "nan_count",  # exact NaN count (detail steps with non-finite gradients)
    "inf_count",  # exact Inf count (detail steps with non-finite gradients)
    "zero_frac",  # fraction of gradient elements exactly zero
    "param_norm",  # L2 norm of the layer's parameters
    "update_ratio",  # ||delta w|| / ||w|| over the optimizer step
    "clip_coef",  # per-layer clipping coefficient (per-layer policies only)
)
#: Whole-model values (`graddiag/global/<stat>`).
GLOBAL_STATS = (
    "grad_norm",  # global L2 norm before clipping
    "clip_coef",  # factor applied to the gradients by global clipping (1 = not clipped)
    "nonfinite",  # number of layers whose gradient holds NaN/Inf
    "grad_reset",  # 1 if gradients were reset since the previous step, 0 if they were carried over
    "backward_calls",  # backward passes that contributed to this step
    "skipped",  # 1 if the optimizer step was skipped (non-finite policy "skip")
    "findings",  # number of new findings at this step
    "loss",
)
HIST = "hist"
FINDINGS = f"{PREFIX}/findings"
#: How graddiag's own event files end (after TensorBoard's `events.out.tfevents.<time>.<host>`):
#: what tells them from other tools' files in a logdir.
EVENT_SUFFIX = ".graddiag"
MODEL = f"{PREFIX}/model"
#: text: the module where a NaN/Inf was born in the backward pass (`trace_nonfinite=True`)
NONFINITE_ORIGIN = f"{PREFIX}/nonfinite_origin"
#: text: under torch.distributed, the ranks whose local gradients held NaN/Inf ("1", "0,1"; "-":
#: none, the sum across ranks overflowed)
NONFINITE_RANKS = f"{PREFIX}/nonfinite_ranks"


def tag(stat: str, layer: str | None = None) -> str:
    """The TensorBoard tag for `stat` of `layer` (or of the whole model when `layer` is None).

    >>> tag("grad_norm", "encoder.0.linear1")
    'graddiag/grad_norm/encoder.0.linear1'
    >>> tag("clip_coef")
    'graddiag/global/clip_coef'
    """
    if not stat or "/" in stat:
        raise ValueError(f"Expected `stat` to be a non-empty name without '/', got {stat!r}")
    if layer is None:
        return f"{PREFIX}/{GLOBAL}/{stat}"
    if not layer:
        raise ValueError(f"Expected `layer` to be a non-empty name or None, got {layer!r}")
    return layer_prefix(stat) + layer


def layer_prefix(stat: str) -> str:
    """What every per-layer tag of `stat` starts with.

    >>> layer_prefix("grad_norm")
    'graddiag/grad_norm/'
    """
    if not stat or "/" in stat or stat == GLOBAL:
        raise ValueError(
            f"Expected `stat` to be a non-empty name without '/' other than {GLOBAL!r} (reserved "
            f"for whole-model values), got {stat!r}"
        )
    return f"{PREFIX}/{stat}/"


def tag_regex(stat: str, per_layer: bool = False) -> str:
    """An anchored regex matching `stat`'s whole-model tag, or its tags of every layer.

    For TensorBoard's custom-scalars charts (its server matches from the start, its browser code
    searches anywhere: hence both anchors).

    >>> tag_regex("grad_norm")
    '^graddiag/global/grad_norm$'
    >>> tag_regex("grad_norm", per_layer=True)
    '^graddiag/grad_norm/.+$'
    """
    if per_layer:
        return f"^{re.escape(layer_prefix(stat))}.+$"
    return f"^{re.escape(tag(stat))}$"


def hist_tag(layer: str) -> str:
    """The tag of `layer`'s gradient histogram."""
    return tag(HIST, layer)


def parse_tag(t: str) -> tuple[str, str | None] | None:
    """Invert `tag`: ``(stat, layer)`` with layer None for global values; None for other tags.

    >>> parse_tag("graddiag/grad_norm/blocks.0.fc")
    ('grad_norm', 'blocks.0.fc')
    >>> parse_tag("graddiag/global/grad_norm")
    ('grad_norm', None)
    >>> parse_tag("loss") is None
    True
    """
    parts = t.split("/", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    if parts[1] == GLOBAL:
        return parts[2], None
    return parts[1], parts[2]
