import json
import math

import pytest

from graddiag import tags
from graddiag.findings import KINDS, Finding, severity_rank


def test_finding_json_has_contract_fields():
    f = Finding(
        step=120,
        layer="enc.0.linear1",
        kind="vanishing",
        severity="warning",
        value=3.1e-9,
        message="m",
        suggestion="s",
    )
    d = json.loads(f.to_json())
    assert d == {
        "step": 120,
        "layer": "enc.0.linear1",
        "kind": "vanishing",
        "severity": "warning",
        "value": 3.1e-9,
        "message": "m",
        "suggestion": "s",
    }
    assert Finding.from_dict(d) == f


def test_finding_nonfinite_value_serializes_as_string():
    f = Finding(1, None, "nonfinite", "error", math.nan, "m", "s")
    assert json.loads(f.to_json())["value"] == "nan"


def test_finding_rejects_bad_severity():
    with pytest.raises(ValueError, match="severity.*'fatal'"):
        Finding(0, None, "nonfinite", "fatal", None, "", "")


def test_contract_kinds_present():
    assert set(KINDS) >= {
        "nonfinite",
        "vanishing",
        "exploding",
        "spike",
        "frozen",
        "detached",
        "accumulation",
        "clipped",
        "validation",
    }
    assert severity_rank("info") < severity_rank("warning") < severity_rank("error")


@pytest.mark.parametrize("layer", ["encoder.layers.0.linear1", "dense_3", "seq/dense/1"])
def test_tag_round_trip(layer):
    assert tags.parse_tag(tags.tag("grad_norm", layer)) == ("grad_norm", layer)
    assert tags.parse_tag(tags.tag("clip_coef")) == ("clip_coef", None)


def test_tag_rejects_bad_stat():
    with pytest.raises(ValueError, match="stat"):
        tags.tag("a/b", "x")
    with pytest.raises(ValueError, match="layer"):
        tags.tag("grad_norm", "")


def test_name_list_shows_the_first_names_then_a_count():
    from graddiag.findings import name_list

    assert name_list(["a", "b"]) == "a, b"
    assert name_list([f"p{i}" for i in range(10)]) == "p0, p1, p2, p3, p4, p5, p6, p7 and 2 more"
    assert name_list(["a", "b", "c"], shown=2) == "a, b and 1 more"
