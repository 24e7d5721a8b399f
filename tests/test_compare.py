"""Run comparison (`graddiag.analysis.compare.compare_runs`), without the CLI."""

import json
import math

import pytest
from test_reader import make_run

from graddiag.analysis import compare_runs
from graddiag.reader import LogReadError

NAMES = ("blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "head")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    make_run(str(root / "a"), steps=20, names=NAMES, seed=0)
    make_run(str(root / "same"), steps=20, names=NAMES, seed=0)
    make_run(str(root / "nan"), steps=20, names=NAMES, seed=0, nan_at=7)
    return root


def test_a_run_does_not_diverge_from_its_copy(runs):
    res = compare_runs(runs / "a", runs / "same")
    assert res["divergence"] is None
    assert (res["common_steps"], res["common_layers"]) == (20, len(NAMES))
    assert all(row["ratio"] == pytest.approx(1.0) for row in res["layers"])
    assert res["only_a"] == [] and res["only_b"] == []


def test_first_divergence_names_the_step_and_layer(runs):
    res = compare_runs(runs / "a", runs / "nan")
    div = res["divergence"]
    assert (div["step"], div["layer"]) == (7, NAMES[1])  # make_run puts the NaN in layer 1
    assert div["a"] is not None and div["b"] is None  # NaN is not a JSON number
    assert {"kind": "nonfinite", "layer": NAMES[1], "severity": "error"} in res["only_b"]


def test_result_is_strict_json(runs):
    res = compare_runs(runs / "a", runs / "nan")
    text = json.dumps(res, allow_nan=False)
    assert json.loads(text)["a"]["path"] == str(runs / "a")


def test_layer_ratios_are_median_b_over_median_a(tmp_path):
    make_run(str(tmp_path / "a"), steps=10, names=NAMES, seed=3)
    make_run(str(tmp_path / "b"), steps=10, names=NAMES, seed=4)
    res = compare_runs(tmp_path / "a", tmp_path / "b")
    for row in res["layers"]:
        assert row["ratio"] == pytest.approx(row["b"] / row["a"])
    logs = [abs(math.log(row["ratio"])) for row in res["layers"]]
    assert logs == sorted(logs, reverse=True)


def test_a_logdir_with_several_runs_is_refused(runs):
    with pytest.raises(LogReadError, match="holds 3 runs"):
        compare_runs(runs, runs / "a")


def test_cli_still_exports_compare_runs():
    import graddiag.cli

    assert graddiag.cli.compare_runs is compare_runs
