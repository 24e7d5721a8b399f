"""The `Finding`: one diagnosis about a training run, per the contract in the design doc."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

SEVERITIES = ("info", "warning", "error")
KINDS = (
    "nonfinite",
    "vanishing",
    "exploding",
    "spike",
    "frozen",
    "detached",
    "accumulation",
    "clipped",
    "validation",
    "dead",
    "starved",
    "zero_gradient",
    "divergence",
    "large_update",
    "modified",
    "unmonitored",
    "unused",
)


def name_list(names, shown: int = 8) -> str:
    """The first `shown` names, comma-separated, then "and N more" for the rest (messages)."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def severity_rank(severity: str) -> int:
    """Order severities so that `info < warning < error`.

    Raises:
        ValueError: if `severity` is not one of `SEVERITIES`.
    """
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(
            f"Expected `severity` to be one of {SEVERITIES}, got {severity!r}"
        ) from None


@dataclass(frozen=True)
class Finding:
    """A diagnosis: what went wrong (or is worth knowing), where, when, and what to do.

    Attributes:
        step: optimizer step at which the finding was made.
        layer: qualified layer name, or None for whole-model findings.
        kind: one of `KINDS` (new kinds may be added; these names never change).
        severity: "info", "warning" or "error".
        value: the measured number behind the finding (a norm, a z-score, a rate), or None.
        message: what happened, in one or two sentences.
        suggestion: what a practitioner can do about it.
    """

    step: int
    layer: str | None
    kind: str
    severity: str
    value: float | None
    message: str
    suggestion: str

    def __post_init__(self) -> None:
        severity_rank(self.severity)
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"Expected `kind` to be a non-empty str, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict (non-finite values become strings "nan"/"inf")."""
        d = asdict(self)
        v = d["value"]
        if v is not None:
            v = float(v)
            d["value"] = v if math.isfinite(v) else str(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """Rebuild a finding from `to_dict()` output."""
        v = d.get("value")
        return cls(
            step=int(d["step"]),
            layer=d.get("layer"),
            kind=d["kind"],
            severity=d["severity"],
            value=None if v is None else float(v),
            message=d.get("message", ""),
            suggestion=d.get("suggestion", ""),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __str__(self) -> str:
        where = f" in {self.layer}" if self.layer else ""
        return f"[{self.severity}] step {self.step}{where}: {self.kind}: {self.message}"
