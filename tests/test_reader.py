"""The event reader against TensorBoard's own loader, on graddiag, torch, TF2 and damaged logs."""

import glob
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from graddiag import tags
from graddiag.events import EventFileWriter
from graddiag.monitor import MonitorCore
from graddiag.reader import LogReadError, read, read_logs
from graddiag.stats import ModelInfo, StepStats

#: Scalars are stored as float32: a value read back equals float32(value) exactly.
F32_EXACT = 0.0
#: float64 sums of float32 values (norms combined from parameter norms).
F64_RTOL = 1e-12


def make_run(
    logdir,
    steps=30,
    layers=4,
    nan_at=None,
    clip=2.0,
    seed=0,
    names=None,
    frozen=("head.weight",),
    detectors=None,
    zero_layer=None,
):
    """A real run of graddiag's writer: MonitorCore fed hand-made step statistics."""
    rng = np.random.default_rng(seed)
    names = tuple(names or (f"blocks.{i}.fc" for i in range(layers)))
    info = ModelInfo(
        layers=names, param_counts=(10,) * len(names), frozen=tuple(frozen), framework="torch"
    )
    mon = MonitorCore(info, logdir, detectors=detectors)
    for s in range(steps):
        g = rng.lognormal(0.0, 0.3, len(names))
        nf = np.zeros(len(names))
        if zero_layer is not None:
            g[zero_layer] = 0.0
        gn = float(np.sqrt(np.sum(g**2)))
        if s == nan_at:
            g[1] = np.nan
            nf[1] = 1
            gn = float("nan")
        mon.process(
            StepStats(
                step=s,
                grad_norm=g,
                has_grad=np.ones(len(names), bool),
                nonfinite=nf,
                global_norm=gn,
                clip_coef=None
                if clip is None
                else (min(1.0, clip / gn) if math.isfinite(gn) else 1.0),
                grad_reset=True,
                backward_calls=1,
                loss=1.0 / (s + 1),
            )
        )
    mon.close()
    return mon


def tensorboard_events(path):
    """Events of one file via TensorBoard's own record reader and protos (the TF-free reader that
    TensorBoard's EventFileLoader uses without TensorFlow; it stops at the first damaged record)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub import errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    reader = PyRecordReader_New(path.encode(), 0, b"")
    while True:
        try:
            reader.GetNext()
        except (errors.OutOfRangeError, errors.DataLossError):
            return
        yield Event.FromString(reader.record())


def reference_scalars(logdir):
    """{(step, tag): value} of every simple_value, via TensorBoard's reader."""
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "**", "*tfevents*"), recursive=True)):
        for ev in tensorboard_events(path):
            for v in ev.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out[(ev.step, v.tag)] = v.simple_value
    return out


def rows(df):
    """{(step, tag): value} rebuilt from reader rows with graddiag's tag scheme."""
    out = {}
    for step, layer, stat, value in zip(df.step, df.layer, df.stat, df.value, strict=True):
        out[(int(step), tags.tag(stat, layer or None))] = value
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert (math.isnan(x) and math.isnan(y)) or x == y, (k, x, y)


@pytest.fixture
def run_dir(tmp_path):
    d = str(tmp_path / "run")
    make_run(d, steps=40, nan_at=20)
    return d


def test_reads_every_scalar_that_tensorboard_reads(run_dir):
    df = read(run_dir)
    assert_same(rows(df), reference_scalars(run_dir))
    assert df.attrs["read_stats"]["corrupt_records"] == 0


def test_values_match_tensorboard_event_file_loader(run_dir):
    """TensorBoard's EventFileLoader (which migrates simple_value to tensors) as the reference."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    ref = {}
    for ev in EventFileLoader(_event_file(run_dir)).Load():
        for v in ev.summary.value:
            if v.metadata.plugin_data.plugin_name == "scalars":
                ref[(ev.step, v.tag)] = float(tensor_util.make_ndarray(v.tensor))
    assert_same(rows(read(run_dir)), ref)


def test_columns_and_global_layer_policy(run_dir):
    df = read(run_dir)
    assert list(df.columns) == ["run", "step", "wall_time", "layer", "stat", "value"]
    assert str(df.step.dtype) == "int64" and str(df.value.dtype) == "float64"
    glob_rows = df[df.stat == "loss"]
    assert len(glob_rows) == 40 and set(glob_rows.layer) == {""}
    assert df.layer.isna().sum() == 0
    assert set(df.run) == {"."}


def test_model_description_is_returned_with_the_run(run_dir):
    data = read_logs(run_dir)
    assert data.runs[0].meta["info"]["layers"] == [f"blocks.{i}.fc" for i in range(4)]
    assert data.runs[0].graddiag


def test_small_chunks_give_the_same_rows(run_dir):
    a = rows(read_logs(run_dir).to_frame())
    b = rows(read_logs(run_dir, chunk_size=97).to_frame())
    assert_same(a, b)


def test_same_length_summaries_with_different_tags_are_not_confused(tmp_path):
    w = EventFileWriter(str(tmp_path), filename_suffix=".graddiag")
    expected = {}
    for s in range(50):
        tag = tags.tag("grad_norm", "aa" if s % 3 else "bb")  # same byte length, other tag
        w.add_scalars(s, (tag,), [float(s)])
        expected[(s, tag)] = np.float32(s)
    w.close()
    assert_same(rows(read(str(tmp_path))), expected)


def test_runs_are_discovered_in_subdirectories(tmp_path):
    make_run(str(tmp_path / "a"), steps=5)
    make_run(str(tmp_path / "b" / "seed1"), steps=7)
    df = read(str(tmp_path))
    assert df.groupby("run", observed=True).step.nunique().to_dict() == {"a": 5, "b/seed1": 7}
    only = read(str(tmp_path), run="b/seed1")
    assert set(only.run) == {"b/seed1"}


def test_step_range_keeps_a_included_b_excluded(run_dir):
    df = read(run_dir, steps="10:15")
    assert sorted(set(df.step)) == [10, 11, 12, 13, 14]
    assert sorted(set(read(run_dir, steps=(None, 3)).step)) == [0, 1, 2]


@pytest.mark.parametrize("bad", ["10", "a:b", "5:2", "1:2:3"])
def test_bad_step_range_names_the_value(run_dir, bad):
    with pytest.raises(LogReadError, match="steps"):
        read(run_dir, steps=bad)


def test_missing_path_and_empty_dir_raise(tmp_path):
    with pytest.raises(LogReadError, match="no such file"):
        read(str(tmp_path / "nope"))
    with pytest.raises(LogReadError, match="no TensorBoard event files"):
        read(str(tmp_path))


def test_empty_event_file_reads_as_no_rows(tmp_path):
    open(tmp_path / "events.out.tfevents.0.host", "wb").close()
    df = read(str(tmp_path))
    assert len(df) == 0 and list(df.columns)[-1] == "value"


def _event_file(d):
    return glob.glob(os.path.join(d, "*tfevents*"))[0]


def _record_offsets(path):
    data = open(path, "rb").read()
    pos, out = 0, []
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 8], "little")
        out.append((pos, n))
        pos += 16 + n
    return data, out


def test_corrupt_record_is_skipped_and_counted(run_dir):
    path = _event_file(run_dir)
    data, recs = _record_offsets(path)
    pos, n = recs[10]
    bad = bytearray(data)
    bad[pos + 12 + n // 2] ^= 0xFF  # flip a byte inside the record's data
    open(path, "wb").write(bytes(bad))
    df = read(run_dir)
    assert df.attrs["read_stats"]["corrupt_records"] == 1
    ref = reference_scalars_without(run_dir, data, recs[10])
    assert_same(rows(df), ref)


def reference_scalars_without(run_dir, data, rec, tmp=None):
    """Reference rows from an intact copy of the file with one record removed."""
    pos, n = rec
    clean = os.path.join(run_dir, "clean")
    os.makedirs(clean, exist_ok=True)
    with open(os.path.join(clean, "events.out.tfevents.ref"), "wb") as f:
        f.write(data[:pos] + data[pos + 16 + n :])
    ref = reference_scalars(clean)
    for f in glob.glob(os.path.join(clean, "*")):
        os.remove(f)
    os.rmdir(clean)
    return ref


def test_corrupt_length_resynchronizes_on_the_next_record(run_dir):
    path = _event_file(run_dir)
    data, recs = _record_offsets(path)
    pos, n = recs[12]
    bad = bytearray(data)
    bad[pos + 1] ^= 0x55  # the length field: its CRC fails, the reader scans for the next header
    open(path, "wb").write(bytes(bad))
    df = read(run_dir)
    st = df.attrs["read_stats"]
    assert st["corrupt_records"] == 1 and st["truncated_files"] == []
    assert_same(rows(df), reference_scalars_without(run_dir, data, recs[12]))


def test_truncated_tail_is_reported_not_raised(run_dir):
    path = _event_file(run_dir)
    data, recs = _record_offsets(path)
    pos, n = recs[-1]
    open(path, "wb").write(data[: pos + 12 + n // 2])
    df = read(run_dir)
    st = df.attrs["read_stats"]
    assert st["truncated_files"] == [path] and st["truncated_bytes"] == 12 + n // 2
    assert_same(rows(df), reference_scalars_without(run_dir, data, recs[-1]))


def test_user_tag_pattern_maps_foreign_scalars(tmp_path):
    w = EventFileWriter(str(tmp_path))
    for s in range(3):
        w.add_scalar_dict(s, {"norms/enc.0": 1.0 + s, "norms/enc.1": 2.0, "gmax/enc.0": 9.0})
    w.close()
    df = read(str(tmp_path), tag_pattern=r"norms/(?P<layer>.+)")
    g = df[df.stat == "grad_norm"]
    assert sorted(set(g.layer)) == ["enc.0", "enc.1"]
    assert g[(g.layer == "enc.0")].value.tolist() == [1.0, 2.0, 3.0]
    df2 = read(str(tmp_path), tag_pattern=r"(?P<stat>gmax|norms)/(?P<layer>.+)")
    assert set(df2[df2.layer == "enc.0"].stat) == {"gmax", "norms"}


def test_tag_pattern_without_layer_group_is_rejected(run_dir):
    with pytest.raises(LogReadError, match="layer"):
        read(run_dir, tag_pattern=r"norms/.+")


def test_lightning_parameter_norms_combine_per_layer(tmp_path):
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    w = torch_tb.SummaryWriter(str(tmp_path))
    for s in range(3):
        w.add_scalar("grad_2.0_norm/encoder.0.weight", 3.0, s)
        w.add_scalar("grad_2.0_norm/encoder.0.bias", 4.0, s)
        w.add_scalar("grad_2.0_norm/head.weight", 0.5 * (s + 1), s)
        w.add_scalar("grad_2.0_norm_total", 7.0, s)
        w.add_scalar("train/loss", 0.1, s)
    w.close()
    df = read(str(tmp_path))
    g = df[df.stat == "grad_norm"]
    enc = g[g.layer == "encoder.0"].value.tolist()
    assert enc == pytest.approx([math.sqrt(3.0**2 + 4.0**2)] * 3, rel=F64_RTOL)
    assert g[g.layer == "head"].value.tolist() == [0.5, 1.0, 1.5]
    assert g[g.layer == ""].value.tolist() == [7.0] * 3
    assert df[df.stat == "train/loss"].value.tolist() == pytest.approx([0.1] * 3, rel=1e-7)


def test_torch_gradient_histograms_give_parameter_norms(tmp_path):
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    rng = np.random.default_rng(0)
    w = torch_tb.SummaryWriter(str(tmp_path))
    vals = {}
    for s in range(2):
        a, b = rng.normal(size=100), rng.normal(size=10)
        w.add_histogram("fc1.weight.grad", a, s)
        w.add_histogram("grad/fc1.bias", b, s)
        w.add_histogram("fc1.weight", a, s)  # a weight histogram: not a gradient, ignored
        vals[s] = math.sqrt(np.sum(a**2) + np.sum(b**2))
    w.close()
    df = read(str(tmp_path))
    assert set(df.layer) == {"fc1"}
    got = df.sort_values("step").value.tolist()
    assert got == pytest.approx([vals[0], vals[1]], rel=1e-6)  # histogram sum_squares is float64


def test_torch_summarywriter_scalars_match_tensorboard(tmp_path):
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    w = torch_tb.SummaryWriter(str(tmp_path))
    for s in range(20):
        for i in range(10):  # one event per value; tags of equal length
            w.add_scalar(tags.tag("grad_norm", f"fc{i}"), (i + 1) / (s + 1), s)
        w.add_scalar(tags.tag("grad_norm"), float("inf") if s == 7 else 2.0, s)
    w.close()
    assert_same(rows(read(str(tmp_path))), reference_scalars(str(tmp_path)))


@pytest.mark.slow
def test_tf2_tensor_scalars_are_read(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from tensorboard.util import tensor_util

    w = tf.summary.create_file_writer(str(tmp_path))
    with w.as_default():
        for s in range(5):
            tf.summary.scalar("grad_2.0_norm/dense.kernel", 0.25 * (s + 1), step=s)
            tf.summary.scalar("grad_2.0_norm_total", np.float64(1.5), step=s)
            tf.summary.histogram("gradients/dense/kernel", np.linspace(-1, 1, 50), step=s)
            tf.summary.text("notes", "hello", step=s)
    w.close()
    ref = {}
    for path in glob.glob(os.path.join(str(tmp_path), "*tfevents*")):
        for ev in tensorboard_events(path):
            for v in ev.summary.value:
                if v.tag.startswith("grad_2.0"):
                    ref[(ev.step, v.tag)] = float(tensor_util.make_ndarray(v.tensor))
    df = read(str(tmp_path))
    g = df[df.stat == "grad_norm"]
    dense = g[g.layer == "dense"].sort_values("step")
    assert (
        g[g.layer == ""].value.to_numpy() == [ref[(s, "grad_2.0_norm_total")] for s in range(5)]
    ).all()
    # the Lightning tag and the histogram describe the same parameter: the first scheme (Lightning)
    # gives the layer's norm, the histogram is not added on top
    for s, v in zip(dense.step, dense.value, strict=True):
        assert v == pytest.approx(ref[(s, "grad_2.0_norm/dense.kernel")], rel=1e-7)
    assert len(dense) == 5


def test_reader_imports_no_framework_or_tensorboard(run_dir):
    code = (
        "import sys; import graddiag.reader as r; r.read_logs(sys.argv[1]);"
        "bad = [m for m in ('torch', 'tensorflow', 'tensorboard', 'pandas') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, run_dir],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_progress_bar_does_not_change_the_rows(run_dir):
    assert_same(rows(read(run_dir, progress=True)), rows(read(run_dir, progress=False)))
