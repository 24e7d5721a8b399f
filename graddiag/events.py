"""A lean TensorBoard event-file writer that never stops training.

Layers, each small (the tensorboardX shape): `RecordWriter` appends framed records
(`graddiag._records.frame`: length, masked crc32c, data, masked crc32c; the reader checks the same
framing) and survives write failures; `EventFileWriter` encodes events, queues them and owns the
thread that writes the queue out every `flush_secs`. Scalars take a fast path: the protobuf bytes
of a step's `Summary` are laid out once per tag set and each step only overwrites the float32
payloads, so writing 200 scalars costs one NumPy scatter. Histograms, text and layouts are rare
and use TensorBoard's own protos. What a crash or a failing disk costs is in docs/guarantees.md.

Why not TensorBoard's writer: without TensorFlow installed it computes CRCs in pure Python and
(through its GFile layer) reopens the file per record; per-value `add_scalar` doubled the step
time of a 100-layer net in our benchmark (see docs/benchmarks.md).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import struct
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np

from graddiag import tags
from graddiag._checks import positive
from graddiag._records import frame
from graddiag._records import masked_crc32c as masked_crc32c  # re-exported

log = logging.getLogger("graddiag")


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


def encode_events(
    steps: Sequence[int], wall_time: float, summaries: Sequence[bytes]
) -> list[bytes]:
    """`encode_event(step, wall_time, summary)` of each step and summary, the parts they share
    encoded once."""
    head = b"\x09" + struct.pack("<d", wall_time) + b"\x10"
    out = []
    size = tag = -1
    for step, summary in zip(steps, summaries, strict=True):
        if len(summary) != size:
            size = len(summary)
            tag = _varint((5 << 3) | 2) + _varint(size)
        out.append(head + _varint(int(step)) + tag + summary)
    return out


class RecordWriter:
    """Appends framed records to one file, and keeps what it could not write yet.

    It never raises on an I/O error: `write_batch` writes what the disk takes and reports where it
    stopped, so the caller keeps the rest and retries. The file is opened for appending and never
    truncated or rewritten; a record cut short by a failed write is finished by the retry (the
    byte stream continues where it stopped), so the file stays a valid record stream. If the file
    disappears (its directory deleted) or its path now names another file, the directory is
    re-created and a new file is started with the header records (`header`) repeated at its
    start, and the cut record written again whole.

    Args:
        path: the event file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.header: list[bytes] = []  # framed records every new file starts with
        self.error: OSError | None = None  # the last write failure, None once writing works
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._opened = False

    def open(self) -> None:
        """Open (create) the file now; raises OSError (used at construction to fail early)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._open(os.O_CREAT)

    def _open(self, flags: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | flags, 0o644)
        st = os.fstat(fd)
        self._fd, self._id, self._opened = fd, (st.st_dev, st.st_ino), True

    def _file_gone(self) -> bool:
        """Whether the open file is no longer at `path` (deleted, or the path replaced)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._id

    def _ensure_open(self) -> bool:
        """Open the file if needed; True when a new file was started (it needs the header)."""
        if self._fd is not None and not self._file_gone():
            return False
        fresh = self._opened
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if fresh:  # never append to a file we did not start
            if os.path.lexists(self.path):
                root, dot, rest = os.path.basename(self.path).partition(tags.EVENT_SUFFIX)
                self.path = os.path.join(
                    os.path.dirname(self.path), f"{root}.r{_next_id()}{dot}{rest}"
                )
            self._open(os.O_CREAT | os.O_EXCL)
        else:
            self._open(os.O_CREAT)
        return fresh

    def write_batch(self, records: list[bytes], head: int = 0) -> tuple[int, int]:
        """Write `records` (the first one from byte `head` on) and return where writing stopped:
        ``(index, offset)`` of the first byte not written, ``(len(records), 0)`` when all were.
        Sets `error` on a failure (and clears it on success); never raises OSError."""
        i, off = 0, head
        try:
            if self._ensure_open():
                off = 0  # the cut record goes whole into the new file, after the header
                self._write_all(b"".join(self.header))
            while i < len(records):
                data = b"".join(records[i : i + 256])
                done = self._write_all(memoryview(data)[off:], stop_early=True)
                while i < len(records) and done > 0:  # advance over what went out
                    left = len(records[i]) - off
                    if done >= left:
                        done -= left
                        i, off = i + 1, 0
                    else:
                        off += done
                        done = 0
            self.error = None
        except OSError as e:
            self.error = e
        return i, off

    def _write_all(self, data, stop_early: bool = False) -> int:
        """os.write until `data` is out; on an error after partial progress with `stop_early`,
        return the count written (the caller records it) and re-raise at the next call."""
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            try:
                done += os.write(self._fd, mv[done:])
            except OSError:
                if stop_early and done:
                    return done
                raise
        return done

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None


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

    def encode_rows(self, rows: np.ndarray) -> list[bytes]:
        """`encode` of each row of `rows` (steps x tags), filled in at once."""
        bufs = np.tile(self._buf, (len(rows), 1))
        bufs[:, self._pos] = np.ascontiguousarray(rows, dtype="<f4").view(np.uint8)
        data = bufs.tobytes()
        size = len(self._buf)
        return [data[i : i + size] for i in range(0, len(data), size)]


#: Bytes of unwritten events a writer keeps while it cannot write (disk full, logdir gone); beyond
#: this the oldest are dropped and counted (see docs/guarantees.md).
MAX_PENDING_BYTES = 64 << 20
#: Unwritten bytes that wake the flush thread before `flush_secs` is up.
_FLUSH_BYTES = 1 << 16
#: The text tag of the note a writer leaves where it had to drop events.
GAP_TAG = "graddiag/log_gap"


class WriteFailureWarning(RuntimeWarning):
    """A log could not be written; graddiag keeps the events in memory and retries."""


class EventFileWriter:
    """Writes TensorBoard events for one run directory; never raises an I/O error after it opened.

    Events are framed into an in-memory queue; a daemon thread owned by the writer writes the
    queue out every `flush_secs` (sooner when 64 KiB are waiting) whether or not new events
    arrive, so a pause in training does not hold events back. The training thread never waits on
    the disk.

    When a write fails (disk full, permission lost, the logdir deleted or replaced by a file) the
    writer warns once (a `WriteFailureWarning` naming the path and the error), keeps the unwritten
    events (at most `max_pending_bytes`; beyond that the oldest are dropped, counted, and a
    ``graddiag/log_gap`` text event says so once writing works again) and retries at each
    flush; a deleted logdir is re-created. `flush()` and `close()` never raise OSError.

    Args:
        logdir: directory of the run; created if missing.
        flush_secs: write queued events at least this often (0: at every write, in the caller's
            thread); `close()` always flushes. A crash (even SIGKILL) loses at most the events of
            the last `flush_secs` (see docs/guarantees.md).
        filename_suffix: appended to the event file's name.
        max_pending_bytes: how much unwritten data to keep while writing fails.
        fail_fast: raise at construction if the file cannot be created (else warn and retry).

    Raises:
        ValueError: if `flush_secs` is not a non-negative number.
        OSError: with `fail_fast`, if `logdir` cannot be created or written (the message names
            the path).
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        flush_secs: float = 2.0,
        filename_suffix: str = "",
        *,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        fail_fast: bool = True,
    ) -> None:
        positive("flush_secs", flush_secs, allow_zero=True)
        positive("max_pending_bytes", max_pending_bytes, integer=True)
        logdir = os.fspath(logdir)
        name = (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{_next_id()}{filename_suffix}"
        )
        self.logdir = logdir
        self._records = RecordWriter(os.path.join(logdir, name))
        if fail_fast:
            try:
                self._records.open()
            except OSError as e:
                raise OSError(
                    f"cannot write TensorBoard logs to logdir {logdir!r}: {e.strerror or e}"
                ) from e
        self.flush_secs = float(flush_secs)
        self.max_pending_bytes = int(max_pending_bytes)
        self._templates: dict[tuple[str, ...], _ScalarTemplate] = {}
        self._lock = threading.Lock()  # the queue
        self._io_lock = threading.Lock()  # the file; taken before `_lock`, never after
        self._queue: deque[bytes] = deque()
        self._head = 0  # bytes of the queue's first record already in the file
        self._queued = 0
        self._closed = False
        self._warned = False
        #: events dropped (and their bytes) because writing failed for too long
        self.dropped_records = 0
        self.dropped_bytes = 0
        self._gap_noted = (0, 0)
        self._write(encode_event(0, time.time(), file_version=b"brain.Event:2"), header=True)
        #: the background thread that writes the queue out every `flush_secs` and runs the jobs
        #: others hand it (`Worker.submit`: a monitor's log-step host work); one per writer
        self.worker = Worker(
            f"graddiag-{name}",
            tick=_weak_flush(weakref.ref(self)) if self.flush_secs > 0 else None,
            interval=self.flush_secs,
        )
        if self.flush_secs <= 0:
            self.flush()
        _live.add(self)

    @property
    def path(self) -> str:
        """The event file (a new name if the writer had to start a new file)."""
        return self._records.path

    def _write(self, event: bytes, header: bool = False) -> None:
        self._write_many([event], header)

    def _write_many(self, events: Sequence[bytes], header: bool = False) -> None:
        recs = [frame(e) for e in events]
        with self._lock:
            if self._closed:
                raise ValueError(f"event file {self.path!r} is closed")
            if header:
                self._records.header.extend(recs)
            self._queue.extend(recs)
            self._queued += sum(map(len, recs))
            if self._queued > self.max_pending_bytes:
                self._drop_oldest()
            due = self._queued >= _FLUSH_BYTES and self._records.error is None
        if self.flush_secs == 0:
            self.flush()
        elif due:
            self.worker.wake()

    def _drop_oldest(self) -> None:
        """Drop the oldest queued events beyond the bound (a record already partly in the file
        stays, so that the file's record stream can be completed)."""
        keep = 1 if self._head else 0
        while self._queued > self.max_pending_bytes and len(self._queue) > keep + 1:
            rec = self._queue[keep]
            del self._queue[keep]
            self._queued -= len(rec)
            self.dropped_records += 1
            self.dropped_bytes += len(rec)

    def add_scalars(
        self, step: int, tags: Sequence[str], values, wall_time: float | None = None
    ) -> None:
        """Write one event holding a `simple_value` per tag (all at `step`).

        `tags` should be the same tuple object from step to step: its encoding is cached.
        """
        tpl = self._template(tags)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(tpl.tags),):
            raise ValueError(
                f"Expected {len(tpl.tags)} values for {len(tpl.tags)} tags, got shape "
                f"{values.shape}"
            )
        self._write(
            encode_event(step, time.time() if wall_time is None else wall_time, tpl.encode(values))
        )

    def add_scalars_rows(
        self, steps: Sequence[int], tags: Sequence[str], rows, wall_time: float | None = None
    ) -> None:
        """`add_scalars` for several steps with the same tags (row k of `rows` at `steps[k]`),
        encoded and queued at once: the same events (one wall time for all, as they are written
        together)."""
        tpl = self._template(tags)
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape != (len(steps), len(tpl.tags)):
            raise ValueError(
                f"Expected `rows` of shape ({len(steps)}, {len(tpl.tags)}) (one value per tag "
                f"for each step), got shape {rows.shape}"
            )
        if not len(steps):
            return
        wall = time.time() if wall_time is None else wall_time
        self._write_many(encode_events(steps, wall, tpl.encode_rows(rows)))

    def _template(self, tags: Sequence[str]) -> _ScalarTemplate:
        """The cached encoding of a tag list."""
        key = tags if isinstance(tags, tuple) else tuple(tags)
        tpl = self._templates.get(key)
        if tpl is None:
            if len(self._templates) > 64:
                self._templates.clear()
            tpl = self._templates[key] = _ScalarTemplate(key)
        return tpl

    def add_scalar_dict(
        self, step: int, scalars: Mapping[str, float], wall_time: float | None = None
    ) -> None:
        """Write `{tag: value}` as one event."""
        self.add_scalars(step, tuple(scalars), list(scalars.values()), wall_time)

    def add_summary(
        self, step: int, summary, wall_time: float | None = None, *, header: bool = False
    ) -> None:
        """Write a `tensorboard.compat.proto.summary_pb2.Summary` (or its serialized bytes).

        With `header`, the event is also repeated at the start of any new file the writer has to
        start (see `RecordWriter`): the run's description survives a deleted logdir.
        """
        data = summary if isinstance(summary, bytes) else summary.SerializeToString()
        event = encode_event(step, time.time() if wall_time is None else wall_time, data)
        self._write(event, header=header)

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

    def add_text(self, step: int, tag: str, text: str, *, header: bool = False) -> None:
        """Write text (rendered as markdown by TensorBoard's text plugin); `header` as in
        `add_summary`."""
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
            step,
            Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=tensor)]),
            header=header,
        )

    def add_custom_scalars_layout(self, layout, step: int = 0, *, header: bool = True) -> None:
        """Write a `custom_scalar.layout_pb2.Layout` so TensorBoard groups the charts (it shows a
        run's latest layout); `header` as in `add_summary`."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.types_pb2 import DT_STRING

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
        tensor = TensorProto(dtype=DT_STRING, string_val=[layout.SerializeToString()])
        self.add_summary(
            step,
            Summary(
                value=[Summary.Value(tag="custom_scalars__config__", metadata=meta, tensor=tensor)]
            ),
            header=header,
        )

    def flush(self) -> None:
        """Write the queued events now (a failure is kept for the next flush, never raised)."""
        with self._io_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._lock:
            batch, head = list(self._queue), self._head
            self._queue.clear()
            self._head = self._queued = 0
        if not batch:
            return
        rw = self._records
        i, off = rw.write_batch(batch, head)
        if i < len(batch):
            rest = batch[i:]
            with self._lock:
                self._queue.extendleft(reversed(rest))
                self._head = off
                self._queued += sum(map(len, rest)) - off
                if self._queued > self.max_pending_bytes:
                    self._drop_oldest()
        if rw.error is not None:
            if not self._warned:
                self._warned = True
                _warn(
                    f"graddiag: cannot write TensorBoard log {rw.path!r}: "
                    f"{rw.error.strerror or rw.error}. Training goes on; graddiag keeps up to "
                    f"{self.max_pending_bytes / 2**20:g} MiB of unwritten events in memory "
                    f"(the oldest beyond that are dropped) and retries every "
                    f"{self.flush_secs:g} s."
                )
            return
        if self._warned:
            self._warned = False
            log.warning("graddiag: writing TensorBoard log %r again", rw.path)
        gap = (self.dropped_records, self.dropped_bytes)
        if gap != self._gap_noted:
            n = gap[0] - self._gap_noted[0]
            b = gap[1] - self._gap_noted[1]
            self._gap_noted = gap
            note = (
                f"graddiag dropped {n} event(s) ({b} bytes) it could not write while the log "
                f"was unwritable (it keeps at most {self.max_pending_bytes} bytes)."
            )
            log.warning("%s (%s)", note, rw.path)
            rec = frame(encode_event(0, time.time(), _text_summary(note)))
            with self._lock:
                self._queue.append(rec)
                self._queued += len(rec)

    def close(self) -> None:
        """Flush and close; never raises OSError (what cannot be written is reported, then lost)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.worker.close(timeout=max(5.0, self.flush_secs))
        with self._io_lock:
            self._flush_locked()
            if self._queued:
                self._flush_locked()  # the gap note, if one was just queued
            if self._records.error is not None and self._queued:
                _warn(
                    f"graddiag: closing TensorBoard log {self.path!r} with {self._queued} bytes "
                    f"unwritten ({self._records.error.strerror or self._records.error})"
                )
            self._records.close()
        _live.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending_bytes(self) -> int:
        """Bytes of events not yet in the file."""
        return self._queued


def _text_summary(text: str) -> bytes:
    """Summary bytes of one text value (tag `GAP_TAG`) without importing TensorBoard."""
    meta = _field_bytes(1, _field_bytes(1, b"text"))  # plugin_data.plugin_name
    tensor = b"\x08\x07" + _field_bytes(8, text.encode("utf-8"))  # dtype DT_STRING, string_val
    value = _field_bytes(1, GAP_TAG.encode()) + _field_bytes(8, tensor) + _field_bytes(9, meta)
    return _field_bytes(1, value)


def _warn(message: str) -> None:
    """Warn without ever raising into training (even under ``-W error``)."""
    try:
        warnings.warn(message, WriteFailureWarning, stacklevel=3)
    except Exception:  # noqa: BLE001 - a warnings filter set to "error" must not stop training
        log.warning(message)


def _weak_flush(ref):
    """A tick that flushes the writer `ref` points to; False (stop ticking) once it is closed or
    garbage-collected."""

    def tick() -> bool:
        w = ref()
        if w is None:
            return False
        try:
            w.flush()
        except Exception:  # noqa: BLE001 - the thread must outlive any surprise
            log.exception("graddiag: flushing %r failed", w.path)
        return not w._closed

    return tick


class Worker:
    """One daemon thread that runs jobs in the order they were submitted and, between them, a
    periodic `tick` (an event writer's flush) every `interval` seconds or sooner when woken.

    A job that raises is reported once as a `WorkerWarning` (later failures are logged) and the
    thread goes on: whatever the job was for (diagnosis, logging) must never stop training.
    `wait()` returns when every job submitted so far has run; `close()` runs the remaining jobs,
    then a last tick, and ends the thread. The thread starts with the first job or tick.

    Args:
        name: the thread's name.
        tick: called every `interval` seconds; returning False stops the ticks (None: no ticks).
        interval: seconds between ticks.
    """

    def __init__(self, name: str, tick=None, interval: float = 0.0) -> None:
        self.name = name
        self._tick = tick
        self._interval = float(interval) if tick is not None and interval > 0 else None
        # `with self._lock` (a C lock: an interrupt cannot land between acquiring and entering
        # the block, as it can inside the Python-level `Condition.__enter__`, which would leave
        # the lock held by a KeyboardInterrupt); `self._cond` only waits and notifies on it
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._jobs: deque = deque()
        self._submitted = self._done = 0
        self._woken = False
        self._busy = False  # a job is running
        self._closing = False
        self._warned = False
        self._thread: threading.Thread | None = None
        #: how many jobs raised
        self.failures = 0
        if self._interval is not None:
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def submit(self, job, *args, **kwargs) -> int:
        """Queue `job(*args, **kwargs)`; returns its ticket for `wait(ticket)`. After `close()`
        (or from the worker thread itself) the job runs at once, in the caller's thread."""
        with self._lock:
            if self._closing or threading.current_thread() is self._thread:
                inline = True
            else:
                inline = False
                if self._thread is None:
                    self._start()
                self._jobs.append((job, args, kwargs))
                self._submitted += 1
                ticket = self._submitted
                self._cond.notify_all()
        if inline:
            self._run(job, args, kwargs)
            return self._submitted
        return ticket

    def wait(self, ticket: int | None = None) -> None:
        """Block until job `ticket` (default: every job submitted so far) has run."""
        if threading.current_thread() is self._thread:
            return
        with self._lock:
            target = self._submitted if ticket is None else ticket
            # (queued or running work left: never waits on a count an interrupt left uneven)
            while (
                self._done < target
                and (self._jobs or self._busy)
                and self._thread is not None
                and self._thread.is_alive()
            ):
                self._cond.wait(0.5)

    @property
    def pending(self) -> int:
        """Jobs submitted and not run yet."""
        return max(0, self._submitted - self._done)

    def wake(self) -> None:
        """Run the tick now (soon), not at the end of the interval."""
        with self._lock:
            self._woken = True
            self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Run the queued jobs and a last tick, then end the thread (idempotent)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        while True:  # jobs the thread did not get to (it died or timed out): run them here
            with self._lock:
                if not self._jobs:
                    break
                job, args, kwargs = self._jobs.popleft()
            self._run(job, args, kwargs)
            with self._lock:
                self._done += 1

    def _run(self, job, args, kwargs) -> None:
        try:
            job(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - background work must never stop training
            self.failures += 1
            if not self._warned:
                self._warned = True
                try:
                    warnings.warn(
                        f"graddiag: background work failed ({type(e).__name__}: {e}); training "
                        "goes on, later failures are logged",
                        WorkerWarning,
                        stacklevel=2,
                    )
                except Exception:  # noqa: BLE001 - even a warnings filter set to "error"
                    pass
            log.warning("graddiag: background work failed", exc_info=True)

    def _loop(self) -> None:
        next_tick = None if self._interval is None else time.monotonic() + self._interval
        while True:
            with self._lock:
                while not self._jobs and not self._woken and not self._closing:
                    timeout = None if next_tick is None else next_tick - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        break
                    self._cond.wait(timeout)
                job = self._jobs.popleft() if self._jobs else None
                self._busy = job is not None
                woken, self._woken = self._woken, False
                closing = self._closing and job is None
            if job is not None:
                try:
                    self._run(*job)
                finally:
                    with self._lock:
                        self._done += 1
                        self._busy = False
                        self._cond.notify_all()
                if not woken and (next_tick is None or time.monotonic() < next_tick):
                    continue
            if closing:
                if self._tick is not None:
                    self._safe_tick()
                return
            if self._tick is not None and not self._safe_tick():
                with self._lock:  # the writer is gone: end here, later jobs run inline
                    if not self._jobs:
                        self._closing = True
                        self._cond.notify_all()
                        return
                self._tick = None
            next_tick = None if self._interval is None else time.monotonic() + self._interval
            if self._tick is None:
                next_tick = None

    def _safe_tick(self) -> bool:
        try:
            return self._tick() is not False
        except Exception:  # noqa: BLE001 - the thread must outlive any surprise
            log.exception("graddiag: %s: periodic work failed", self.name)
            return True


class WorkerWarning(RuntimeWarning):
    """Background work (diagnosis or logging of a step) failed; training went on."""


_live: weakref.WeakSet[EventFileWriter] = weakref.WeakSet()


def flush_all() -> None:
    """Flush every open writer (at exit and on SIGTERM)."""
    for w in list(_live):
        w.flush()


atexit.register(flush_all)


_counter = 0
_counter_lock = threading.Lock()


def _next_id() -> int:
    global _counter
    with _counter_lock:
        _counter += 1
        return _counter
