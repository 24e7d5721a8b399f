"""Fuzzing the reader: a corpus of mutated real event files (truncations, bit flips, wrong and huge
length fields, wrong CRCs, garbage protobufs with valid framing, spliced garbage) plus
hypothesis-generated inputs. None may crash, hang or allocate what a length field claims; the
whole corpus must read in well under a minute.

``GRADDIAG_FUZZ_N`` (default 10000) sets the corpus size; ``GRADDIAG_FUZZ_SEED`` its seed.
"""

from __future__ import annotations

import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graddiag import _records
from graddiag.analysis.report import analyze_logs
from graddiag.monitor import MonitorCore
from graddiag.reader import LogReadError, read_logs
from graddiag.stats import ModelInfo, StepStats

N = int(os.environ.get("GRADDIAG_FUZZ_N", "10000"))
SEED = int(os.environ.get("GRADDIAG_FUZZ_SEED", "0"))
#: the slowest a single small variant may read (a hang shows up here)
PER_FILE_S = 2.0


def _real_log(tmp_path) -> bytes:
    """Bytes of a real graddiag event file: layout, model text, scalars, histograms, findings."""
    info = ModelInfo(layers=("enc.0", "enc.1", "head"), param_counts=(4, 4, 2))
    d = tmp_path / "src"
    core = MonitorCore(info, d, close_at_exit=False, flush_secs=0)
    rng = np.random.default_rng(0)
    for step in range(12):
        norms = rng.uniform(0.1, 2, 3)
        if step == 7:
            norms[1] = np.nan
        core.process(
            StepStats(
                step=step,
                grad_norm=norms,
                has_grad=np.array([True, True, step % 3 != 0]),
                nonfinite=np.array([0, int(step == 7), 0]),
                global_norm=float(np.nansum(norms**2) ** 0.5),
                loss=1.0 / (step + 1),
            )
        )
        if step % 4 == 0:
            rows = np.zeros((3, 37))
            rows[:, :30] = rng.integers(0, 5, (3, 30))
            rows[:, 30:] = [-1.0, 1.0, 0.1, 2.0, 30, 0, 0]
            core.write_histograms(step, rows, np.ones(3, bool))
    core.close()
    (path,) = [p for p in d.iterdir()]
    return path.read_bytes()


def _records_of(data: bytes) -> list[tuple[int, int]]:
    """(start, length) of each record (header start, data length)."""
    recs, p = [], 0
    while p + 12 <= len(data):
        (n,) = struct.unpack_from("<Q", data, p)
        recs.append((p, n))
        p += 16 + n
    return recs


def _mutate(base: bytes, recs, rng: np.random.Generator) -> bytes:
    b = bytearray(base)
    kind = int(rng.integers(9))
    p, n = recs[int(rng.integers(len(recs)))]
    if kind == 0:  # truncation
        return bytes(b[: int(rng.integers(len(b)))])
    if kind == 1:  # bit flips
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == 2:  # wrong length, header CRC left stale
        b[p : p + 8] = struct.pack("<Q", int(rng.integers(0, 1 << 20)))
        return bytes(b)
    if kind == 3:  # wrong or huge length with a valid header CRC
        choices = [n + 1, max(0, n - 1), 1 << 31, 1 << 40, (1 << 64) - 1, 1 << 27]
        length = choices[int(rng.integers(len(choices)))]
        hdr = struct.pack("<Q", length)
        b[p : p + 12] = hdr + struct.pack("<I", _records.masked_crc32c(hdr))
        return bytes(b)
    if kind == 4:  # wrong CRC (header or data)
        at = p + 8 if rng.integers(2) else p + 12 + n
        b[at : at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        return bytes(b)
    if kind == 5:  # garbage protobuf, framed correctly
        junk = rng.integers(0, 256, int(rng.integers(0, 2 * n + 2)), dtype=np.uint8).tobytes()
        return bytes(b[:p]) + _records.frame(junk) + bytes(b[p + 16 + n :])
    if kind == 6:  # a protobuf mutated inside, framed correctly (reaches the decoders)
        data = bytearray(b[p + 12 : p + 12 + n])
        for _ in range(int(rng.integers(1, 4))):
            if data:
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        return bytes(b[:p]) + _records.frame(bytes(data)) + bytes(b[p + 16 + n :])
    if kind == 7:  # garbage spliced in
        junk = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        i = int(rng.integers(len(b)))
        return bytes(b[:i]) + junk + bytes(b[i:])
    i, j = sorted(int(x) for x in rng.integers(0, len(b), 2))  # a stretch deleted
    return bytes(b[:i] + b[j:])


def _read(path: str) -> None:
    """Read one variant: it may hold nothing usable, but must not crash or hang."""
    t = time.perf_counter()
    data = read_logs(path)
    assert time.perf_counter() - t < PER_FILE_S
    rs = data.read_stats
    assert rs.corrupt_records >= 0 and rs.truncated_bytes >= 0
    return data


def test_mutation_corpus_reads_without_crash_or_hang(tmp_path):
    base = _real_log(tmp_path)
    recs = _records_of(base)
    rng = np.random.default_rng(SEED)
    path = str(tmp_path / "events.out.tfevents.0.fuzz")
    start = time.perf_counter()
    analyzed = 0
    for k in range(N):
        variant = _mutate(base, recs, rng)
        with open(path, "wb") as f:
            f.write(variant)
        try:
            data = _read(path)
        except Exception as e:
            raise AssertionError(f"variant {k} (seed {SEED}) crashed the reader: {e!r}") from e
        if k % 50 == 0:  # and the analysis on top of it
            try:
                analyze_logs(data)
            except LogReadError:
                pass  # "no gradient tags" is a fine answer for a shredded file
            analyzed += 1
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"{N} variants took {elapsed:.1f} s"
    assert analyzed == len(range(0, N, 50))


def test_huge_length_fields_never_allocate_what_they_claim(tmp_path):
    base = _real_log(tmp_path)
    recs = _records_of(base)
    path = str(tmp_path / "events.out.tfevents.0.huge")
    for length in (_records.MAX_RECORD + 1, 1 << 40, (1 << 64) - 1):
        p, n = recs[len(recs) // 2]
        hdr = struct.pack("<Q", length)
        variant = base[:p] + hdr + struct.pack("<I", _records.masked_crc32c(hdr)) + base[p + 12 :]
        with open(path, "wb") as f:
            f.write(variant)
        tracemalloc.start()
        data = read_logs(path, chunk_size=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2 << 20  # a few chunks, not the claimed length
        # the records after the damaged one are still read
        assert data.read_stats.corrupt_records == 1
        assert max(r.step.max() for r in data.runs if len(r.step)) == 11


def test_corrupt_stretch_is_named_in_a_note(tmp_path):
    base = _real_log(tmp_path)
    p, n = _records_of(base)[5]
    garbage = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "events.out.tfevents.0.garbage"
    path.write_bytes(base[: p + 7] + garbage + base[p + 7 :])
    data = read_logs(str(path))
    (note,) = data.read_stats.notes
    assert note.startswith("skipped 1 corrupt record(s) (1.0 MiB) in ") and str(path) in note


def test_64_mib_of_garbage_is_resynchronized_at_c_speed(tmp_path):
    base = _real_log(tmp_path)
    garbage = np.random.default_rng(2).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "events.out.tfevents.0.big"
    path.write_bytes(base[:2000] + garbage + bytes(1 << 20) + base[2000:])
    t = time.perf_counter()
    data = read_logs(str(path))
    elapsed = time.perf_counter() - t
    assert elapsed < 10, elapsed  # was 83 s with a byte-by-byte Python scan
    assert max(r.step.max() for r in data.runs) == 11


@settings(
    max_examples=int(os.environ.get("GRADDIAG_FUZZ_HYPOTHESIS", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    records=st.lists(st.binary(max_size=300), max_size=8),
    raw=st.binary(max_size=64),
    cut=st.integers(0, 4000),
)
def test_hypothesis_framed_garbage(tmp_path, records, raw, cut):
    data = b"".join(_records.frame(r) for r in records) + raw
    path = tmp_path / "events.out.tfevents.0.hyp"
    path.write_bytes(data[: max(cut, len(data) - cut)])
    _read(str(path))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5), st.binary(max_size=40))))
def test_hypothesis_protobuf_shaped_events(tmp_path_factory, fields):
    """Events built from random protobuf fields (tags, wire types, payloads), validly framed."""
    out = bytearray()
    for f, wt, payload in fields:
        out += bytes([(f << 3 | wt) & 0x7F])
        if wt == 2:
            out += bytes([len(payload) & 0x7F]) + payload[:127]
        else:
            out += payload[:8]
    d = tmp_path_factory.mktemp("pb")
    (d / "events.out.tfevents.0.pb").write_bytes(
        _records.frame(b"\x09" + bytes(8) + b"\x10\x01" + b"\x2a" + bytes([len(out) & 0x7F]))
        + _records.frame(bytes(out))
        + _records.frame(b"\x09" + bytes(8) + b"\x10\x02\x2a" + bytes([len(out) & 0x7F]) + out)
    )
    _read(str(d / "events.out.tfevents.0.pb"))


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_non_regular_files_are_skipped_with_a_note(tmp_path, kind):
    base = _real_log(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.out.tfevents.1.good").write_bytes(base)
    odd = run / "events.out.tfevents.2.odd"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.mkdir()
    data = read_logs(str(run))  # a FIFO would block open() forever
    assert max(r.step.max() for r in data.runs) == 11
    if kind == "fifo":
        assert any("not a regular file" in n and str(odd) in n for n in data.read_stats.notes)
