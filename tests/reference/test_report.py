"""`ValidationReport` ranking and its bad input, on hand-built agreements (no framework)."""

from __future__ import annotations

import math

import pytest

from graddiag.reference.validate import (
    TOLERANCES,
    LayerAgreement,
    ParameterAgreement,
    ValidationReport,
)

TOL = TOLERANCES["float32"]


def param(name: str, rel: float, rel_f64: float | None = 0.0) -> ParameterAgreement:
    return ParameterAgreement(name, "layer", (2,), rel, rel, rel_f64, TOL)


def layer(rel: float, rel_f64: float | None = 0.0) -> LayerAgreement:
    return LayerAgreement("layer", ("w",), "float32", rel, rel, rel_f64, rel_f64, TOL)


def test_badness_is_the_worst_error_over_its_tolerance_by_hand():
    p = param("w", rel=TOL / 2, rel_f64=3 * TOLERANCES["float64"])
    assert p.badness == pytest.approx(3.0) and not p.ok
    assert layer(TOL / 2, None).badness == pytest.approx(0.5) and layer(TOL / 2, None).ok
    assert layer(2 * TOL).badness == pytest.approx(2.0) and not layer(2 * TOL).ok


@pytest.mark.parametrize("rel, rel_f64", [(math.nan, 0.0), (0.0, math.nan)])
def test_a_nan_error_is_out_of_tolerance_and_ranked_worst(rel, rel_f64):
    bad = param("nan", rel, rel_f64)
    assert not bad.ok and not layer(rel, rel_f64).ok
    report = ValidationReport("torch", "float32", 0.0, 0.0, parameters=[param("a", 2 * TOL), bad])
    assert [p.name for p in report.worst()] == ["nan", "a"]


def test_worst_n_and_format_limit_keep_the_n_worst():
    params = [param("a", TOL / 2), param("b", 3 * TOL), param("c", 2 * TOL)]
    report = ValidationReport("torch", "float32", 0.0, 0.0, parameters=params)
    assert [p.name for p in report.worst(2)] == ["b", "c"]
    rows = report.format(limit=2).splitlines()[2:]
    assert [r.split()[0] for r in rows[:2]] == ["b", "c"]
    assert rows[2] == "... 1 more, all no worse than the last row"


@pytest.mark.parametrize("bad", [0, -1])
def test_worst_and_format_reject_a_count_below_1_naming_it(bad):
    report = ValidationReport("torch", "float32", 0.0, 0.0, parameters=[param("a", TOL)])
    with pytest.raises(ValueError, match=f"Expected `n` >= 1, got {bad}"):
        report.worst(bad)
    with pytest.raises(ValueError, match=f"Expected `limit` >= 1, got {bad}"):
        report.format(limit=bad)
