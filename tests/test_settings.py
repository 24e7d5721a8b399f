"""One settings object: every adapter and callback rejects a bad setting at construction, naming the
argument and the value, before any training step runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graddiag.clip import Chain, GlobalNormClip
from graddiag.settings import Settings

#: (keyword arguments, text the error must contain)
BAD = [
    ({"detectors": {"bogus": {}}}, "bogus"),
    ({"detectors": 42}, "`detectors`"),
    ({"detectors": {"exploding": {"factor": -1.0}}}, "factor"),
    ({"detectors": {"spike": {"no_such_key": 1}}}, "spike"),
    ({"flush_secs": -1}, "`flush_secs`"),
    ({"flush_secs": math.inf}, "`flush_secs`"),
    ({"every": 0}, "`every`"),
    ({"every": 2.5}, "`every`"),
    ({"detail_every": -1}, "`detail_every`"),
    ({"hist_every": "10"}, "`hist_every`"),
    ({"history": -3}, "`history`"),
    ({"clip": "1.0"}, "`clip`"),
    ({"clip": []}, "`clip`"),
    ({"nonfinite": "ignore"}, "`nonfinite`"),
]


@pytest.mark.parametrize(
    "kwargs, text", BAD, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD)]
)
def test_bad_setting_names_argument_and_value(kwargs, text):
    with pytest.raises(ValueError, match=text) as err:
        Settings(**kwargs)
    value = next(iter(kwargs.values()))
    if not isinstance(value, dict):
        assert repr(value) in str(err.value)


def test_trace_nonfinite_must_be_a_bool():
    with pytest.raises(ValueError, match="`trace_nonfinite`.*'no'"):
        Settings(trace_nonfinite="no")


def test_logdir_that_is_a_file_fails_at_construction(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError, match=str(f)):
        Settings(logdir=f)


def test_normalised_values(tmp_path):
    s = Settings(logdir=tmp_path / "run", clip=1.0, flush_secs=np.float32(0.5), every=np.int64(3))
    assert isinstance(s.clip, Chain) and isinstance(s.clip.policies[0], GlobalNormClip)
    assert s.flush_secs == 0.5 and s.every == 3 and isinstance(s.every, int)
    assert s.logdir == str(tmp_path / "run") and (tmp_path / "run").is_dir()
    assert Settings(hist_every=5).hist_every == 0  # nothing to write histograms to


def test_numpy_numbers_are_accepted_as_thresholds():
    Settings(detectors={"exploding": {"factor": np.float32(100.0)}})
    Settings(clip=GlobalNormClip(np.float32(1.0)))


def test_range_message_does_not_claim_inf_is_allowed():
    with pytest.raises(ValueError, match=r"\(0, inf\)"):
        GlobalNormClip(-1.0)


def test_amp_default_added_unless_the_user_set_it():
    s = Settings().with_detector_defaults("nonfinite", amp=True)
    assert s.detectors == {"nonfinite": {"amp": True}}
    s = Settings(detectors={"nonfinite": {"amp": False}}).with_detector_defaults(
        "nonfinite", amp=True
    )
    assert s.detectors["nonfinite"] == {"amp": False}
    assert Settings(detectors={"nonfinite": False}).with_detector_defaults(
        "nonfinite", amp=True
    ).detectors == {"nonfinite": False}


# ---------------------------------------------------------------------------- every adapter


def _torch_monitor(**kwargs):
    torch = pytest.importorskip("torch")
    from graddiag.torch import GradientMonitor

    model = torch.nn.Linear(3, 2)
    return GradientMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def _tf_monitor(**kwargs):
    keras = pytest.importorskip("keras")
    from graddiag.tf import GradientMonitor

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return GradientMonitor(model, **kwargs)


def _keras_callback(**kwargs):
    pytest.importorskip("keras")
    from graddiag.integrations.keras import GradDiagCallback

    return GradDiagCallback(**kwargs)


MAKERS = {"torch": _torch_monitor, "tf": _tf_monitor, "keras_callback": _keras_callback}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"detectors": {"bogus": {}}}, "bogus"),
        ({"detectors": 42}, "`detectors`"),
        ({"flush_secs": -1}, "`flush_secs`"),
        ({"every": 0}, "`every`"),
        ({"clip": "x"}, "`clip`"),
        ({"detectors": {"exploding": {"factor": 0}}}, "factor"),
    ],
)
def test_every_adapter_fails_at_construction(make, kwargs, text):
    with pytest.raises(ValueError, match=text):
        make(**kwargs)


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_every_adapter_checks_the_logdir_at_construction(make, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError, match="logdir"):
        make(logdir=str(f / "run"))
    assert f.read_text() == "x"
