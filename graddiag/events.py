"""A lean TensorBoard event-file writer.

Layers, each small (the tensorboardX shape): `RecordWriter` frames records with
`graddiag._records.frame` (length, masked crc32c, data, masked crc32c; the reader checks the same
framing); `EventFileWriter` encodes events. Scalars take a fast path: the protobuf bytes of a step's `Summary` are laid out once per tag set and each step only overwrites
the float32 payloads, so writing 200 scalars costs one NumPy scatter and one `write`.
Histograms, text and layouts are rare and use TensorBoard's own protos.

Why not TensorBoard's writer: without TensorFlow installed it computes CRCs in pure Python and
(through its GFile layer) reopens the file per record; per-value `add_scalar` doubled the step
time of a 100-layer net in our benchmark (see docs/benchmarks.md).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np

from graddiag._checks import positive
from graddiag._records import frame
from graddiag._records import masked_crc32c as masked_crc32c  # re-exported


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, summary: bytes | None = None, **raw: bytes) -> bytes:
    """Protobuf bytes of a `tensorflow.Event` (wall_time=1, step=2, file_version=3, summary=5)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(int(step))
    if "file_version" in raw:
        out += _field_bytes(3, raw["file_version"])
    if summary is not None:
        out += _field_bytes(5, summary)
    return out


class RecordWriter:
    """Appends TFRecord-framed records to one open, buffered file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "ab", buffering=1 << 16)  # noqa: SIM115 - closed in close()

    def write(self, data: bytes) -> None:
        self._f.write(frame(data))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


class _ScalarTemplate:
    """Pre-encoded `Summary` bytes for a fixed list of tags; each write fills in the floats."""

    def __init__(self, tags: Sequence[str]) -> None:
        buf = bytearray()
        offsets = []
        for t in tags:
            tb = t.encode("utf-8")
            value = _field_bytes(1, tb) + b"\x15"  # tag=1 (string), simple_value=2 (float32)
            entry = _varint((1 << 3) | 2) + _varint(len(value) + 4) + value
            buf += entry
            offsets.append(len(buf))
            buf += b"\0\0\0\0"
        self.tags = tuple(tags)
        self._buf = np.frombuffer(bytes(buf), dtype=np.uint8).copy()
        self._pos = (np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(4)).ravel()

    def encode(self, values: np.ndarray) -> bytes:
        self._buf[self._pos] = np.ascontiguousarray(values, dtype="<f4").view(np.uint8)
        return self._buf.tobytes()


class EventFileWriter:
    """Writes TensorBoard events for one run directory.

    Args:
        logdir: directory of the run; created if missing.
        flush_secs: flush to disk when this many seconds passed since the last flush (checked at
            every write); `close()` always flushes. A crash loses at most this interval.
        filename_suffix: appended to the event file's name.

    Raises:
        ValueError: if `flush_secs` is not a non-negative number.
        OSError: if `logdir` cannot be created or written (the message names the path).
    """

    def __init__(
        self, logdir: str | os.PathLike, flush_secs: float = 2.0, filename_suffix: str = ""
    ) -> None:
        positive("flush_secs", flush_secs, allow_zero=True)
        logdir = os.fspath(logdir)
        try:
            os.makedirs(logdir, exist_ok=True)
            name = (
                f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{_next_id()}{filename_suffix}"
            )
            self.path = os.path.join(logdir, name)
            self._records = RecordWriter(self.path)
        except OSError as e:
            raise OSError(
                f"cannot write TensorBoard logs to logdir {logdir!r}: {e.strerror or e}"
            ) from e
        self.logdir = logdir
        self.flush_secs = float(flush_secs)
        self._last_flush = time.monotonic()
        self._templates: dict[tuple[str, ...], _ScalarTemplate] = {}
        self._lock = threading.Lock()
        self._write(encode_event(0, time.time(), file_version=b"brain.Event:2"))

    def _write(self, event: bytes) -> None:
        with self._lock:
            if self._records.closed:
                raise ValueError(f"event file {self.path!r} is closed")
            self._records.write(event)
            now = time.monotonic()
            if now - self._last_flush >= self.flush_secs:
                self._records.flush()
                self._last_flush = now

    def add_scalars(
        self, step: int, tags: Sequence[str], values, wall_time: float | None = None
    ) -> None:
        """Write one event holding a `simple_value` per tag (all at `step`).

        `tags` should be the same tuple object from step to step: its encoding is cached.
        """
        key = tags if isinstance(tags, tuple) else tuple(tags)
        tpl = self._templates.get(key)
        if tpl is None:
            if len(self._templates) > 64:
                self._templates.clear()
            tpl = self._templates[key] = _ScalarTemplate(key)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(key),):
            raise ValueError(
                f"Expected {len(key)} values for {len(key)} tags, got shape {values.shape}"
            )
        self._write(
            encode_event(step, time.time() if wall_time is None else wall_time, tpl.encode(values))
        )

    def add_scalar_dict(
        self, step: int, scalars: Mapping[str, float], wall_time: float | None = None
    ) -> None:
        """Write `{tag: value}` as one event."""
        self.add_scalars(step, tuple(scalars), list(scalars.values()), wall_time)

    def add_summary(self, step: int, summary, wall_time: float | None = None) -> None:
        """Write a `tensorboard.compat.proto.summary_pb2.Summary` (or its serialized bytes)."""
        data = summary if isinstance(summary, bytes) else summary.SerializeToString()
        self._write(encode_event(step, time.time() if wall_time is None else wall_time, data))

    def add_histogram(
        self,
        step: int,
        tag: str,
        counts,
        edges,
        vmin: float,
        vmax: float,
        vsum: float,
        vsum_sq: float,
        num: float,
    ) -> None:
        """Write a histogram; `edges` are the right bucket limits (len(edges) == len(counts))."""
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        h = HistogramProto(
            min=vmin,
            max=vmax,
            num=num,
            sum=vsum,
            sum_squares=vsum_sq,
            bucket_limit=list(map(float, edges)),
            bucket=list(map(float, counts)),
        )
        self.add_summary(step, Summary(value=[Summary.Value(tag=tag, histo=h)]))

    def add_text(self, step: int, tag: str, text: str) -> None:
        """Write text (rendered as markdown by TensorBoard's text plugin)."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.compat.proto.types_pb2 import DT_STRING

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(
            dtype=DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
        )
        self.add_summary(
            step, Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)])
        )

    def add_custom_scalars_layout(self, layout) -> None:
        """Write a `custom_scalar.layout_pb2.Layout` so TensorBoard groups the charts."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.types_pb2 import DT_STRING

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
        tensor = TensorProto(dtype=DT_STRING, string_val=[layout.SerializeToString()])
        self.add_summary(
            0,
            Summary(
                value=[Summary.Value(tag="custom_scalars__config__", metadata=meta, tensor=tensor)]
            ),
        )

    def flush(self) -> None:
        with self._lock:
            if not self._records.closed:
                self._records.flush()
                self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._records.close()

    @property
    def closed(self) -> bool:
        return self._records.closed


_counter = 0
_counter_lock = threading.Lock()


def _next_id() -> int:
    global _counter
    with _counter_lock:
        _counter += 1
        return _counter
