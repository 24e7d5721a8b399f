"""The lean writer's files load in TensorBoard's own reader, byte for byte."""

import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from graddiag.events import EventFileWriter, masked_crc32c

FLOAT32_RTOL = 1e-7


def _load(path):
    return list(EventFileLoader(path).Load())


def _scalar(v):
    """TensorBoard's loader may migrate simple_value into a tensor; accept both."""
    return v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]


def test_masked_crc_matches_tensorboard():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_crc

    for data in (b"", b"a", b"graddiag" * 100, bytes(range(256))):
        assert masked_crc32c(data) == tb_crc(data)


def test_scalars_round_trip_one_event_per_step(tmp_path):
    w = EventFileWriter(tmp_path)
    tag_names = tuple(f"graddiag/grad_norm/layer{i}" for i in range(200))
    rng = np.random.default_rng(0)
    written = rng.random((5, 200)) * 10.0 ** rng.integers(-8, 8, (5, 200))
    for step, vals in enumerate(written):
        w.add_scalars(step, tag_names, vals)
    w.close()
    events = _load(w.path)
    assert events[0].file_version == "brain.Event:2"
    steps = [e for e in events[1:] if e.step in range(5) and len(e.summary.value) == 200]
    assert len(steps) == 5  # all 200 values of a step share one event
    for e in steps:
        got = {v.tag: _scalar(v) for v in e.summary.value}
        assert list(got) == list(tag_names)
        np.testing.assert_allclose(
            [got[t] for t in tag_names], written[e.step].astype(np.float32), rtol=FLOAT32_RTOL
        )


def test_nonfinite_scalars_survive(tmp_path):
    w = EventFileWriter(tmp_path)
    w.add_scalar_dict(3, {"a": float("nan"), "b": float("inf"), "c": -1.5})
    w.close()
    vals = {v.tag: _scalar(v) for v in _load(w.path)[-1].summary.value}
    assert np.isnan(vals["a"]) and vals["b"] == np.inf and vals["c"] == -1.5


def test_text_histogram_and_accumulator(tmp_path):
    w = EventFileWriter(tmp_path)
    w.add_text(2, "graddiag/findings", "| a | b |")
    w.add_histogram(4, "graddiag/hist/fc", [1, 2, 3], [0.1, 0.2, 0.3], 0.0, 0.3, 1.4, 0.3, 6)
    w.add_scalar_dict(5, {"graddiag/global/grad_norm": 2.5})
    w.close()
    acc = EventAccumulator(
        str(tmp_path), size_guidance={"tensors": 0, "histograms": 0, "scalars": 0}
    )
    acc.Reload()
    assert acc.Scalars("graddiag/global/grad_norm")[0].value == 2.5
    assert acc.Histograms("graddiag/hist/fc")[0].histogram_value.bucket == [1, 2, 3]
    assert acc.Tensors("graddiag/findings")[0].tensor_proto.string_val == [b"| a | b |"]


def test_flush_on_interval_and_close(tmp_path):
    w = EventFileWriter(tmp_path, flush_secs=0)
    w.add_scalar_dict(1, {"x": 1.0})
    assert len(_load(w.path)) == 2  # flushed without close: a crash would keep it
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add_scalar_dict(2, {"x": 1.0})
    assert len(_load(w.path)) == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="flush_secs.*-1"):
        EventFileWriter(tmp_path, flush_secs=-1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="logdir"):
        EventFileWriter(blocker / "sub")
    w = EventFileWriter(tmp_path)
    with pytest.raises(ValueError, match="2 values for 2 tags"):
        w.add_scalars(0, ("a", "b"), [1.0])
    w.close()
    assert os.path.getsize(w.path) > 0


def test_rows_of_scalars_are_the_events_of_add_scalars_step_by_step(tmp_path):
    """`add_scalars_rows` (a run of steps with the same tags, encoded at once) writes the same
    bytes as `add_scalars` step by step at the same wall time, and TensorBoard reads them back."""
    tag_names = tuple(f"graddiag/grad_norm/l{i}" for i in range(7))
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 1, (12, 7)) * 10.0 ** rng.integers(-30, 30, (12, 7))
    rows[3, 2], rows[5, 0] = np.nan, -np.inf
    steps = [0, 1, 2, 127, 128, 300, 16383, 16384, 2**31, 2**40, 7, 5]  # 1- to 6-byte varints
    files = []
    for mode in ("steps", "rows"):
        w = EventFileWriter(tmp_path / mode, flush_secs=0)  # the header is in the file now
        header = os.path.getsize(w.path)
        if mode == "steps":
            for step, row in zip(steps, rows, strict=True):
                w.add_scalars(step, tag_names, row, wall_time=1234.5)
        else:
            w.add_scalars_rows(steps, tag_names, rows, wall_time=1234.5)
        w.close()
        with open(w.path, "rb") as f:
            files.append(f.read()[header:])  # after the file_version record (its own time)
    assert files[0] == files[1] and len(files[0]) > 12 * 7 * 4
    events = _load(w.path)[1:]
    assert [e.step for e in events] == steps and {e.wall_time for e in events} == {1234.5}
    got = np.array([[_scalar(v) for v in e.summary.value] for e in events])
    np.testing.assert_array_equal(got, rows.astype(np.float32))


def test_rows_of_the_wrong_shape_are_refused_by_name(tmp_path):
    w = EventFileWriter(tmp_path)
    with pytest.raises(ValueError, match=r"`rows` of shape \(2, 3\).*got shape \(2, 2\)"):
        w.add_scalars_rows([0, 1], ("a", "b", "c"), np.zeros((2, 2)))
    w.close()
