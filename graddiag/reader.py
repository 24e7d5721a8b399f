"""A fast, streaming reader of TensorBoard event files, for post-hoc gradient analysis.

`read(logdir)` returns every scalar of every run as a long pandas DataFrame (columns ``run, step,
wall_time, layer, stat, value``); `read_logs(logdir)` returns the same data as NumPy columns without
importing pandas (the CLI's fast path).

How it stays fast without TensorBoard or TensorFlow on the path:

* Files are read in chunks (bounded memory whatever the file size). Records are framed as TFRecords
  (`graddiag._records`: length, masked CRC-32C of the length, data, masked CRC-32C of the data);
  both CRCs are checked.
  A record whose data CRC fails is skipped and counted; a corrupt length makes the reader search
  forward for the next valid header (vectorised, `graddiag._records.find_header`); a truncated tail
  is counted; non-regular files are skipped. None of these raise; each is named in
  `ReadStats.notes`.
* A directory's files are put together in the order they were written: a restarted step count
  supersedes the earlier events from that step on (TensorBoard's purge rule); files written at the
  same time by concurrent monitors become runs ``RUN#1``, ``RUN#2`` (see docs/guarantees.md).
* The protobufs (`Event`, `Summary`, `Summary.Value`, `TensorProto`, `HistogramProto`) are decoded by
  a small wire-format decoder written here.
* graddiag writes one event per step holding hundreds of ``simple_value`` entries with the same tags
  every step. The first such summary becomes a *template* (its bytes with the float payloads masked
  out); later summaries of the same length are checked against it byte for byte and their floats are
  gathered, a whole chunk of events at a time, with NumPy. Anything that does not match exactly goes
  through the general decoder, so the fast path can never return a wrong value.

Both scalar encodings are read: ``simple_value`` (torch's SummaryWriter, tensorboardX, graddiag) and
TF2's tensor-encoded scalars (``tf.summary.scalar``: ``tensor.float_val``/``double_val`` or
``tensor_content``, plugin ``scalars``; TF writes the plugin metadata only with a tag's first event,
so it is remembered per run).

Tag mapping (tag -> ``(layer, stat)``), first match wins:

1. ``tag_pattern``: a user regex, matched in full against scalar and histogram tags, with a named
   group ``layer`` and optionally ``stat`` (default ``grad_norm``; a histogram gives the L2 norm of its
   values). Several tags mapping to the same layer and step are combined as for Lightning below.
2. graddiag's own scheme (`graddiag.tags`): ``graddiag/<stat>/<layer>`` and
   ``graddiag/global/<stat>`` (layer ``""``).
3. Lightning's ``grad_2.0_norm_total`` -> global ``grad_norm``, and ``grad_2.0_norm/<param>``: the
   parameter's layer is its name minus the last dotted (or ``/``) component
   (``encoder.0.weight`` -> ``encoder.0``); a layer's norm is the root of the sum of its parameters'
   squared norms.
4. Gradient histograms: tags such as ``grad/<param>``, ``gradients/<param>``, ``<param>/grad`` or
   ``<param>.grad`` (case-insensitive; ``_grad``/``_gradient`` suffixes too). The parameter's norm is
   ``sqrt(sum_squares)`` of the histogram (exact for ``HistogramProto``; from bucket centres for TF2
   tensor histograms), combined per layer as in 3.
5. Any other scalar tag is kept with layer ``""`` and stat = the tag itself; other histograms,
   images, audio and text are skipped.

Layer policy: whole-model values have layer ``""`` (never None/NaN), so the columns hold strings
only and group/filter without special cases.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat as _stat
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from graddiag import _records, tags
from graddiag.events import GAP_TAG

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "LogData",
    "LogReadError",
    "ReadStats",
    "RunData",
    "discover_runs",
    "parse_steps",
    "read",
    "read_logs",
]

_CHUNK = 8 << 20
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_PROGRESS_MIN_BYTES = 32 << 20
_MAX_TEMPLATES_PER_KEY = 16

#: How several tags that map to one (step, layer, stat) are combined.
_COMBINE = {
    "grad_norm": "rss",
    "param_norm": "rss",
    "grad_max": "max",
    "nonfinite": "sum",
    "nan_count": "sum",
    "inf_count": "sum",
}

_LIGHTNING_TOTAL = "grad_2.0_norm_total"
_LIGHTNING_PREFIX = "grad_2.0_norm/"
_GRAD_HIST = re.compile(
    r"(?i)(?:grads?|gradients?)[/.](?P<param>.+)|(?P<param2>.+?)(?:[/._](?:grads?|gradients?))"
)
#: A section prefix some trainers put before their scalars (HF Trainer: ``train/grad_norm``).
_SECTION = r"(?:(?:train|training|trainer|optim|optimizer|metrics|stats)/)?"
#: Whole-model gradient norm scalars (``grad_norm``, ``train/grad_norm``, ``grad_norm_total``, ...).
_GLOBAL_NORM = re.compile(
    rf"(?i){_SECTION}(?:(?:(?:total|global)_)?grad(?:ient)?s?_norm(?:_total)?"
    r"|grad(?:ient)?s?_norms?/(?:total|global|all|total_norm|global_norm))"
)
#: Per-parameter gradient norm scalars: ``grad_norm/<param>`` (``gradient_norms/<param>``, ...).
_PARAM_NORM = re.compile(rf"(?i){_SECTION}grad(?:ient)?s?_norms?/(?P<param>.+)")
#: ``grad/<param>``, ``gradients/<param>`` scalars: norms unless the name ends in another statistic.
_PARAM_GRAD = re.compile(r"(?i)(?:grads?|gradients?)/(?P<param>.+?)(?:[/._](?:l2_?)?norm)?")
_NOT_A_NORM = re.compile(
    r"(?i)(?:.*[/._])?(?:mean|avg|average|std|stddev|var|variance|min|max|median|sum|abs_?mean|"
    r"abs_?max|sparsity|zero_?frac(?:tion)?|hist(?:ogram)?|l1(?:_?norm)?|linf(?:_?norm)?|"
    r"inf_?norm|max_?norm|rms|snr|count|nan|inf)"
)
#: Source priorities of the combined (per-parameter) schemes: a (step, layer, stat) logged by
#: several schemes takes the rows of the first one only, so the same parameter is never counted
#: twice (e.g. a ``grad_norm/<param>`` scalar next to a ``<param>.grad`` histogram).
_USER, _LIGHTNING, _NORM_SCALAR, _GRAD_SCALAR, _HISTOGRAM = 1, 2, 3, 4, 5


class LogReadError(ValueError):
    """The log directory or an argument cannot be read; the message names the path or value."""


@dataclass
class ReadStats:
    """What the reader saw, including what it had to skip.

    Attributes:
        files: event files read.
        bytes: bytes read.
        records: intact records.
        events: events decoded.
        scalars: scalar values decoded (before tag mapping and step filtering).
        corrupt_records: records skipped because a CRC did not match, a length was corrupt or
            the event inside could not be decoded.
        corrupt_bytes: bytes those corrupt records (and stretches of garbage) spanned.
        truncated_files: files whose last record is incomplete (e.g. still being written).
        truncated_bytes: bytes in those incomplete tails.
        unreadable_files: ``(path, reason)`` for files that could not be opened.
        first_step, last_step: the range of steps the scalars cover (before `steps` filtering).
        notes: one line per unusual thing the reader handled (corrupt stretches, restarted or
            concurrent runs, skipped non-regular files, events the writer had to drop).
    """

    files: int = 0
    bytes: int = 0
    records: int = 0
    events: int = 0
    scalars: int = 0
    corrupt_records: int = 0
    corrupt_bytes: int = 0
    truncated_files: list[str] = field(default_factory=list)
    truncated_bytes: int = 0
    unreadable_files: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_step: int | None = None
    last_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "records": self.records,
            "events": self.events,
            "scalars": self.scalars,
            "corrupt_records": self.corrupt_records,
            "corrupt_bytes": self.corrupt_bytes,
            "truncated_files": list(self.truncated_files),
            "truncated_bytes": self.truncated_bytes,
            "unreadable_files": [list(x) for x in self.unreadable_files],
            "notes": list(self.notes),
            "first_step": self.first_step,
            "last_step": self.last_step,
        }


@dataclass
class RunData:
    """One run's scalars as NumPy columns; `layer`/`stat` are codes into `LogData.layers`/`stats`.

    Attributes:
        run: run name (path relative to the log directory, ``"."`` for the directory itself).
        path: the run directory.
        step, wall_time, layer, stat, value: one entry per scalar.
        meta: the ``graddiag/model`` JSON of a graddiag run (model description, detector settings),
            else None.
        graddiag: whether the run holds graddiag's own tags.
        nonfinite_origins: step -> module where a NaN/Inf was born (``graddiag/nonfinite_origin``).
        nonfinite_ranks: step -> ranks whose local gradients held NaN/Inf, as written
            (``graddiag/nonfinite_ranks``).
    """

    run: str
    path: str
    step: np.ndarray
    wall_time: np.ndarray
    layer: np.ndarray
    stat: np.ndarray
    value: np.ndarray
    meta: dict[str, Any] | None = None
    graddiag: bool = False
    nonfinite_origins: dict[int, str] = field(default_factory=dict)
    nonfinite_ranks: dict[int, str] = field(default_factory=dict)


@dataclass
class LogData:
    """Everything `read_logs` found: runs, the code tables, and the reading statistics."""

    logdir: str
    runs: list[RunData]
    layers: list[str]
    stats: list[str]
    read_stats: ReadStats
    steps: tuple[int | None, int | None] = (None, None)

    def to_frame(self) -> pd.DataFrame:
        """The long-format DataFrame (categorical ``run``/``layer``/``stat`` columns)."""
        import pandas as pd

        n = [len(r.step) for r in self.runs]
        names = [r.run for r in self.runs]
        cat = pd.Categorical.from_codes
        cols = {
            "run": cat(np.repeat(np.arange(len(n), dtype=np.int32), n), categories=names),
            "step": _cat([r.step for r in self.runs], np.int64),
            "wall_time": _cat([r.wall_time for r in self.runs], np.float64),
            "layer": cat(_cat([r.layer for r in self.runs], np.int32), categories=self.layers),
            "stat": cat(_cat([r.stat for r in self.runs], np.int32), categories=self.stats),
            "value": _cat([r.value for r in self.runs], np.float64),
        }
        df = pd.DataFrame(cols)
        df.attrs["read_stats"] = self.read_stats.to_dict()
        df.attrs["meta"] = {r.run: r.meta for r in self.runs if r.meta is not None}
        return df


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0].astype(dtype, copy=False)
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.empty(0, dtype)


def parse_steps(steps: str | tuple | slice | None) -> tuple[int | None, int | None]:
    """Normalize a step range: ``"A:B"``, ``(A, B)`` or ``slice(A, B)``; A included, B excluded.

    Either end may be omitted (``"100:"``, ``":500"``) or None.

    Raises:
        LogReadError: if the range is malformed.
    """
    if steps is None:
        return None, None
    if isinstance(steps, slice):
        steps = (steps.start, steps.stop)
    if isinstance(steps, str):
        parts = steps.split(":")
        if len(parts) != 2:
            raise LogReadError(f"Expected `steps` as 'A:B' (either end optional), got {steps!r}")
        try:
            steps = tuple(int(p) if p.strip() else None for p in parts)
        except ValueError:
            raise LogReadError(f"Expected `steps` as 'A:B' with integers, got {steps!r}") from None
    if (
        not isinstance(steps, tuple)
        or len(steps) != 2
        or not all(
            s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, bool))
            for s in steps
        )
    ):
        raise LogReadError(f"Expected `steps` as 'A:B', (A, B) or slice(A, B), got {steps!r}")
    a, b = steps
    if a is not None and b is not None and b <= a:
        raise LogReadError(f"Expected `steps` A:B with B > A, got {steps!r}")
    return (None if a is None else int(a)), (None if b is None else int(b))


def _is_event_file(name: str) -> bool:
    return "tfevents" in name and not name.endswith((".tmp", ".lock"))


def discover_runs(logdir: str | os.PathLike) -> list[tuple[str, str, list[str]]]:
    """Find runs: directories under `logdir` (itself included) holding event files.

    Returns:
        ``(run_name, run_dir, event_files)`` sorted by run name; files sorted by name (which begins
        with the creation time). `logdir` may also be a single event file.

    Raises:
        LogReadError: if `logdir` does not exist or holds no event files.
    """
    path = os.fspath(logdir)
    if not os.path.exists(path):
        raise LogReadError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        return [(".", os.path.dirname(path) or ".", [path])]
    if not os.path.isdir(path):
        raise LogReadError(f"{path}: not a directory or an event file")
    if not os.access(path, os.R_OK | os.X_OK):
        raise LogReadError(f"{path}: permission denied")
    runs = []
    for d, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        ev = sorted(f for f in files if _is_event_file(f))
        if ev:
            rel = os.path.relpath(d, path).replace(os.sep, "/")
            runs.append((rel, d, [os.path.join(d, f) for f in ev]))
    if not runs:
        raise LogReadError(f"{path}: no TensorBoard event files (events.out.tfevents.*) found")
    return sorted(runs)


def _layer_of(param: str) -> str:
    """The layer owning parameter `param`: the name minus its last ``.``/``/`` component."""
    name = param.split(":", 1)[0] if re.search(r":\d+$", param) else param
    cut = max(name.rfind("."), name.rfind("/"))
    return name[:cut] if cut > 0 else name


class _Template:
    """A summary layout of simple_values only: static bytes plus float payload offsets."""

    __slots__ = ("length", "width", "pad", "words", "mask", "fpos", "tag_ids")

    def __init__(self, data: bytes, float_offsets: list[int], tag_ids: list[int]) -> None:
        n = len(data)
        self.length = n
        self.width = (n + 7) // 8 * 8
        self.pad = b"\0" * (self.width - n)
        tpl = np.zeros(self.width, np.uint8)
        tpl[:n] = np.frombuffer(data, np.uint8)
        mask = np.zeros(self.width, np.uint8)
        mask[:n] = 0xFF
        fpos = (np.asarray(float_offsets, np.int64)[:, None] + np.arange(4)).ravel()
        tpl[fpos] = 0
        mask[fpos] = 0
        self.words = tpl.view(np.uint64)
        self.mask = mask.view(np.uint64)
        self.fpos = fpos
        self.tag_ids = np.asarray(tag_ids, np.int64)


class _Run:
    """Decoding state and collected columns of one event file of a run."""

    def __init__(self, name: str, path: str, plugins: dict[str, str] | None = None) -> None:
        self.name = name
        self.path = path
        self.file = ""
        # TF writes a tag's plugin metadata with its first event only: shared by a run's files
        self.plugins: dict[str, str] = {} if plugins is None else plugins
        # the file's extent before step filtering: step and wall-time range of its scalars
        self.step_lo = self.wall_lo = math.inf
        self.step_hi = self.wall_hi = -math.inf
        self.tag_set: set[int] = set()
        self.cols: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.meta: dict[str, Any] | None = None
        self.origins: dict[int, str] = {}
        self.ranks: dict[int, str] = {}
        self.own = False
        # generic-path rows, flushed into `cols` per chunk
        self.g_step: list[int] = []
        self.g_wall: list[float] = []
        self.g_tag: list[int] = []
        self.g_val: list[float] = []


class _Reader:
    """Decodes event files into per-run columns (see the module docstring)."""

    def __init__(
        self,
        tag_pattern: str | None,
        step_range: tuple[int | None, int | None],
        chunk_size: int = _CHUNK,
    ) -> None:
        if tag_pattern is not None:
            try:
                self.user_re = re.compile(tag_pattern)
            except re.error as e:
                raise LogReadError(f"Bad `tag_pattern` {tag_pattern!r}: {e}") from None
            if "layer" not in self.user_re.groupindex:
                raise LogReadError(
                    f"Expected `tag_pattern` to have a named group (?P<layer>...), got {tag_pattern!r}"
                )
        else:
            self.user_re = None
        self.lo, self.hi = step_range
        self.chunk_size = chunk_size
        self.stats = ReadStats()
        # templates by (summary length, static bytes before the first float); the prefixes'
        # lengths in use per summary length are in `sig_ends`
        self.templates: dict[tuple[int, bytes], list[_Template]] = {}
        self.sig_ends: dict[int, list[int]] = {}
        self.tag_ids: dict[tuple[str, bool], int] = {}
        # per tag id: layer code, stat code (-1: skip), combine (0 direct, 1 needs combining)
        self.t_layer: list[int] = []
        self.t_stat: list[int] = []
        self.t_comb: list[int] = []
        self.t_own: list[bool] = []
        self.layers: dict[str, int] = {}
        self.stat_codes: dict[str, int] = {}
        self._lut: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.progress = None
        self.task = None

    # ---- tags ------------------------------------------------------------------------------
    def _tag_id(self, tag: str, hist: bool) -> int:
        key = (tag, hist)
        i = self.tag_ids.get(key)
        if i is None:
            i = self.tag_ids[key] = len(self.t_layer)
            layer, stat, comb, own = self._map(tag, hist)
            self.t_layer.append(self._code(self.layers, layer) if stat else -1)
            self.t_stat.append(self._code(self.stat_codes, stat) if stat else -1)
            self.t_comb.append(comb)
            self.t_own.append(own)
            self._lut = None
        return i

    @staticmethod
    def _code(table: dict[str, int], name: str) -> int:
        c = table.get(name)
        if c is None:
            c = table[name] = len(table)
        return c

    def _map(self, tag: str, hist: bool) -> tuple[str, str | None, int, bool]:
        """(layer, stat or None to skip, combine?, graddiag's own tag?) for one tag."""
        if self.user_re is not None:
            m = self.user_re.fullmatch(tag)
            if m:
                stat = m.groupdict().get("stat") or "grad_norm"
                return m.group("layer") or "", stat, _USER, False
        parsed = tags.parse_tag(tag)
        if parsed is not None:
            stat, layer = parsed
            if hist or stat == tags.HIST:
                return "", None, 0, True
            return layer or "", stat, 0, True
        if hist:
            m = _GRAD_HIST.fullmatch(tag)
            if m:
                param = m.group("param") or m.group("param2")
                return _layer_of(param), "grad_norm", _HISTOGRAM, False
            return "", None, 0, False
        if tag == _LIGHTNING_TOTAL:
            return "", "grad_norm", _LIGHTNING, False
        if tag.startswith(_LIGHTNING_PREFIX) and len(tag) > len(_LIGHTNING_PREFIX):
            return _layer_of(tag[len(_LIGHTNING_PREFIX) :]), "grad_norm", _LIGHTNING, False
        if _GLOBAL_NORM.fullmatch(tag):
            return "", "grad_norm", 0, False
        m = _PARAM_NORM.fullmatch(tag)
        if m and not _NOT_A_NORM.fullmatch(m.group("param")):
            return _layer_of(m.group("param")), "grad_norm", _NORM_SCALAR, False
        m = _PARAM_GRAD.fullmatch(tag)
        if m and not _NOT_A_NORM.fullmatch(tag):
            return _layer_of(m.group("param")), "grad_norm", _GRAD_SCALAR, False
        return "", tag, 0, False

    def lut(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._lut is None:
            self._lut = (
                np.asarray(self.t_layer, np.int32),
                np.asarray(self.t_stat, np.int32),
                np.asarray(self.t_comb, np.int8),
            )
        return self._lut

    # ---- files -----------------------------------------------------------------------------
    def read_run(self, name: str, path: str, files: Sequence[str]) -> list[RunData]:
        """The run(s) in one directory: each file is read on its own, then the files are put
        together (`_assemble`)."""
        plugins: dict[str, str] = {}
        pieces = []
        for f in files:
            piece = _Run(name, path, plugins)
            piece.file = f
            self._read_file(f, piece)
            pieces.append(piece)
        return [
            self._finish(run_name, path, stream)
            for run_name, stream in self._assemble(name, pieces)
        ]

    def _assemble(self, name: str, pieces: list[_Run]) -> list[tuple[str, list[_Run]]]:
        """Group a directory's files into runs and apply TensorBoard's restart rule.

        Files are taken in the order they were written (first wall time). A file written while
        another one was being written (overlapping wall times) that logs the same tags at the
        same steps comes from a concurrent monitor (a GAN's generator and discriminator): it
        starts a run of its own (named ``RUN#2``, ...). Otherwise it continues a run; if it
        starts at a step the run already has (a resumed run, the same model again), its events
        supersede the run's earlier ones from that step on (TensorBoard's purge rule), unless it logs
        none of the run's layers (another model: a run of its own, `_other_model`). All are
        noted in `ReadStats.notes`.
        """
        for p in pieces:
            p.tag_set = (
                set(np.unique(np.concatenate([c[2] for c in p.cols])).tolist())
                if (p.cols)
                else set()
            )
        timed = sorted((p for p in pieces if p.wall_lo <= p.wall_hi), key=lambda p: p.wall_lo)
        streams: list[list[_Run]] = []
        other_model = 0  # streams started because a later file logs another model's layers
        for p in timed:
            for s in streams:
                if not any(_collide(p, q) for q in s) and not self._other_model(p, s):
                    s.append(p)
                    break
            else:
                other_model += bool(streams) and not any(_collide(p, q) for s in streams for q in s)
                streams.append([p])
        rest = [p for p in pieces if not p.wall_lo <= p.wall_hi]  # no scalars (e.g. headers only)
        if not streams:
            streams = [rest]
        else:
            streams[0][:0] = rest
        for s in streams:
            self._purge(s)
        if len(streams) == 1:
            return [(name, streams[0])]
        names = [f"{name}#{k + 1}" for k in range(len(streams))]
        files = "; ".join(
            f"{n}: " + ", ".join(os.path.basename(p.file) for p in s)
            for n, s in zip(names, streams, strict=True)
        )
        if other_model:
            why = (
                "a later session logs other layers from an earlier step (another model, e.g. a "
                "second fit() of a new model), so it does not supersede the first"
            )
            if other_model < len(streams) - 1:
                why += "; others were written at the same time"
        else:
            why = "written at the same time (overlapping wall times, same tags and steps)"
        self.stats.notes.append(
            f"run {name!r}: {len(streams)} monitors wrote to the directory ({why}); "
            f"kept apart as runs ({files})"
        )
        return list(zip(names, streams, strict=True))

    def _other_model(self, p: _Run, stream: list[_Run]) -> bool:
        """Whether file `p` would restart `stream`'s step count with a different model: it starts
        at a step the stream already has and none of its layers is one the stream logged. A
        resumed run logs the same layers and supersedes (TensorBoard's purge rule); a new model
        in the same directory is a run of its own."""
        if p.step_lo > max(q.step_hi for q in stream):
            return False
        mine = self._layer_ids(p)
        theirs = set().union(*(self._layer_ids(q) for q in stream))
        return bool(mine) and bool(theirs) and mine.isdisjoint(theirs)

    def _layer_ids(self, p: _Run) -> set[int]:
        blank = self.layers.get("")
        return {self.t_layer[t] for t in p.tag_set if self.t_layer[t] not in (-1, blank)}

    def _purge(self, stream: list[_Run]) -> None:
        """Drop the rows a later, non-overlapping file supersedes (steps >= its first step)."""
        for i, p in enumerate(stream):
            if not p.wall_lo <= p.wall_hi:
                continue
            earlier = [q for q in stream[:i] if q.wall_lo <= q.wall_hi and q.wall_hi <= p.wall_lo]
            cut = p.step_lo
            dropped: set[int] = set()
            for q in earlier:
                for k, (rs, rw, tid, rv) in enumerate(q.cols):
                    keep = rs < cut
                    if not keep.all():
                        dropped.update(np.unique(rs[~keep]).tolist())
                        q.cols[k] = (rs[keep], rw[keep], tid[keep], rv[keep])
            if dropped:
                self.stats.notes.append(
                    f"run {p.name!r}: steps restart at {int(cut)} in {os.path.basename(p.file)} "
                    f"(a resumed run or a new session in the same directory); its events "
                    f"supersede {len(dropped)} earlier step(s) from {int(cut)} to "
                    f"{max(dropped)} (TensorBoard's purge rule)"
                )

    def _read_file(self, path: str, run: _Run) -> None:
        try:
            st = os.stat(path)
        except OSError as e:
            self.stats.unreadable_files.append((path, e.strerror or str(e)))
            return
        if not _stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            self.stats.notes.append(f"skipped {path}: not a regular file")
            return
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            self.stats.unreadable_files.append((path, e.strerror or str(e)))
            return
        self.stats.files += 1
        self._resync = False
        corrupt0, bytes0 = self.stats.corrupt_records, self.stats.corrupt_bytes
        buf = b""
        pos = 0
        need = self.chunk_size
        with fh:
            while True:
                try:
                    chunk = fh.read(need)
                except OSError as e:
                    self.stats.unreadable_files.append((path, e.strerror or str(e)))
                    chunk = b""
                final = not chunk
                if final and pos >= len(buf):
                    break
                self.stats.bytes += len(chunk)
                if self.progress is not None and chunk:
                    self.progress.advance(self.task, len(chunk))
                buf = buf[pos:] + chunk if pos < len(buf) else chunk
                pending: dict[tuple[int, bytes], tuple[list, list, list]] = {}
                pos = self._scan(buf, run, pending, final)
                self._flush(buf, run, pending)
                if final:
                    break
                # a record longer than a chunk: read the rest of it at once
                need = max(self.chunk_size, _records.bytes_needed(buf, pos))
        tail = len(buf) - pos
        if tail > 0:
            self.stats.truncated_files.append(path)
            self.stats.truncated_bytes += tail
        corrupt = self.stats.corrupt_records - corrupt0
        if corrupt:
            self.stats.notes.append(
                f"skipped {corrupt} corrupt record(s) ({_size(self.stats.corrupt_bytes - bytes0)})"
                f" in {path}"
            )

    def _scan(self, buf: bytes, run: _Run, pending: dict, final: bool = False) -> int:
        """Frame and check records in `buf`; return where the first incomplete record starts."""
        records, pos, corrupt, skipped, self._resync = _records.scan(buf, self._resync, final)
        self.stats.corrupt_bytes += skipped
        st = self.stats
        st.corrupt_records += corrupt
        st.records += len(records)
        unpack_f64 = _F64.unpack_from
        templates = self.templates
        sig_ends = self.sig_ends
        for s, end in records:
            length = end - s
            # Event: wall_time (1, fixed64), step (2, varint), summary (5, bytes), in that order
            # from every writer we know; anything else takes the general path.
            if length > 12 and buf[s] == 0x09 and buf[s + 9] == 0x10:
                wall = unpack_f64(buf, s + 1)[0]
                p = s + 10
                b = buf[p]
                if b < 0x80:
                    step = b
                    p += 1
                else:
                    step, p = _varint(buf, p)
                    if step >= 1 << 63:
                        step -= 1 << 64
                if p + 1 < end and buf[p] == 0x2A:
                    slen = buf[p + 1]
                    if slen < 0x80:
                        q = p + 2
                    else:
                        slen, q = _varint(buf, p + 1)
                    if q + slen == end:
                        st.events += 1
                        key = None
                        for se in sig_ends.get(slen, ()):
                            k = (slen, buf[q : q + se])
                            if k in templates:
                                key = k
                                break
                        if key is not None:
                            pend = pending.get(key)
                            if pend is None:
                                pend = pending[key] = ([], [], [])
                            pend[0].append(q)
                            pend[1].append(step)
                            pend[2].append(wall)
                        else:
                            self._summary(buf, q, end, step, wall, run)
                        continue
                if p == end:
                    st.events += 1
                    continue
            self._event(buf, s, end, run)
        return pos

    def _flush(self, buf: bytes, run: _Run, pending: dict) -> None:
        """Verify pending summaries against their templates and gather their floats."""
        mv = memoryview(buf)
        self._flush_generic(run)
        for key, (starts, steps, walls) in pending.items():
            slen = key[0]
            starts_a = np.asarray(starts, np.int64)
            steps_a = np.asarray(steps, np.int64)
            walls_a = np.asarray(walls, np.float64)
            for tpl in self.templates[key]:
                if not len(starts_a):
                    break
                pad = tpl.pad
                parts = []
                for s in starts_a.tolist():
                    parts.append(mv[s : s + slen])
                    parts.append(pad)
                raw = np.frombuffer(b"".join(parts), np.uint8).reshape(len(starts_a), tpl.width)
                words = (
                    raw.view(np.uint64) if raw.ctypes.data % 8 == 0 else raw.copy().view(np.uint64)
                )
                ok = ~((words ^ tpl.words) & tpl.mask).any(axis=1)
                if ok.any():
                    vals = raw[ok].take(tpl.fpos, axis=1).view("<f4")
                    self._emit(run, steps_a[ok], walls_a[ok], tpl.tag_ids, vals)
                bad = ~ok
                starts_a, steps_a, walls_a = starts_a[bad], steps_a[bad], walls_a[bad]
            for s, step, wall in zip(
                starts_a.tolist(), steps_a.tolist(), walls_a.tolist(), strict=True
            ):
                self._summary(buf, s, s + slen, step, wall, run)
        self._flush_generic(run)

    def _flush_generic(self, run: _Run) -> None:
        if run.g_tag:
            self._emit(
                run,
                np.asarray(run.g_step, np.int64),
                np.asarray(run.g_wall, np.float64),
                np.asarray(run.g_tag, np.int64),
                np.asarray(run.g_val, np.float64)[:, None],
                per_row=True,
            )
            run.g_step, run.g_wall, run.g_tag, run.g_val = [], [], [], []

    def _emit(
        self,
        run: _Run,
        steps: np.ndarray,
        walls: np.ndarray,
        tag_ids: np.ndarray,
        vals: np.ndarray,
        per_row: bool = False,
    ) -> None:
        """Append rows: `vals` is (events, tags) for a template, or (rows, 1) with per-row tags."""
        if not per_row:
            self.stats.scalars += vals.size  # generic-path values are counted as decoded
        if len(steps):
            run.step_lo = min(run.step_lo, int(steps.min()))
            run.step_hi = max(run.step_hi, int(steps.max()))
            st = self.stats
            st.first_step = (
                run.step_lo if st.first_step is None else min(st.first_step, run.step_lo)
            )
            st.last_step = run.step_hi if st.last_step is None else max(st.last_step, run.step_hi)
            run.wall_lo = min(run.wall_lo, float(walls.min()))
            run.wall_hi = max(run.wall_hi, float(walls.max()))
        lo, hi = self.lo, self.hi
        if lo is not None or hi is not None:
            keep = np.ones(len(steps), bool)
            if lo is not None:
                keep &= steps >= lo
            if hi is not None:
                keep &= steps < hi
            if not keep.all():
                steps, walls, vals = steps[keep], walls[keep], vals[keep]
                if per_row:
                    tag_ids = tag_ids[keep]
        if not len(steps):
            return
        t_layer, t_stat, _ = self.lut()
        if not run.own:
            run.own = any(self.t_own[i] for i in set(tag_ids.tolist()))
        if per_row:
            tid = tag_ids.astype(np.int32)
            rs, rw, rv = steps, walls, vals[:, 0].astype(np.float64)
        else:
            k = len(tag_ids)
            tid = np.tile(tag_ids.astype(np.int32), len(steps))
            rs, rw = np.repeat(steps, k), np.repeat(walls, k)
            rv = vals.reshape(-1).astype(np.float64)
        keep = t_stat[tid] >= 0
        if not keep.all():
            tid, rs, rw, rv = tid[keep], rs[keep], rw[keep], rv[keep]
        run.cols.append((rs, rw, tid, rv))

    # ---- protobuf decoding -----------------------------------------------------------------
    def _event(self, buf: bytes, s: int, e: int, run: _Run) -> None:
        """General `Event` decode (field order and extra fields of any writer); an event that does
        not decode is counted as corrupt."""
        try:
            self._event_fields(buf, s, e, run)
        except (IndexError, struct.error, ValueError, UnicodeDecodeError):
            self.stats.corrupt_records += 1

    def _event_fields(self, buf: bytes, s: int, e: int, run: _Run) -> None:
        wall, step, summ = 0.0, 0, None
        p = s
        while p < e:
            key, p = _varint(buf, p)
            f, wt = key >> 3, key & 7
            if f == 1 and wt == 1:
                wall = _F64.unpack_from(buf, p)[0]
                p += 8
            elif f == 2 and wt == 0:
                step, p = _varint(buf, p)
                if step >= 1 << 63:
                    step -= 1 << 64
            elif f == 5 and wt == 2:
                n, p = _varint(buf, p)
                summ = (p, p + n)
                p += n
            else:
                p = _skip(buf, p, wt)
        if p != e:
            self.stats.corrupt_records += 1
            return
        self.stats.events += 1
        if summ is not None:
            self._summary(buf, summ[0], summ[1], step, wall, run)

    def _summary(self, buf: bytes, s: int, e: int, step: int, wall: float, run: _Run) -> None:
        """General `Summary` decode; registers a template when all values are simple_values."""
        p = s
        simple = True
        offsets: list[int] = []
        tag_list: list[int] = []
        try:
            while p < e:
                key, p = _varint(buf, p)
                if key != 0x0A:
                    simple = False
                    p = _skip(buf, p, key & 7)
                    continue
                n, p = _varint(buf, p)
                off = self._value(buf, p, p + n, step, wall, run)
                if off is None:
                    simple = False
                else:
                    offsets.append(off[0] - s)
                    tag_list.append(off[1])
                p += n
        except (IndexError, struct.error, UnicodeDecodeError, ValueError):
            self.stats.corrupt_records += 1
            return
        if p != e:
            self.stats.corrupt_records += 1
            return
        if simple and offsets:
            # a summary of simple_values only: later summaries with the same static bytes take
            # the vectorized path
            se = min(offsets)
            same = self.templates.setdefault((e - s, bytes(buf[s : s + se])), [])
            if len(same) < _MAX_TEMPLATES_PER_KEY:
                same.append(_Template(bytes(buf[s:e]), offsets, tag_list))
            ends = self.sig_ends.setdefault(e - s, [])
            if se not in ends and len(ends) < _MAX_TEMPLATES_PER_KEY:
                ends.append(se)

    def _value(self, buf: bytes, s: int, e: int, step: int, wall: float, run: _Run):
        """Decode one `Summary.Value`; return (float offset, tag id) if it is tag + simple_value."""
        tag = None
        simple_at = -1
        others = False
        histo = tensor = meta = None
        p = s
        while p < e:
            key, p = _varint(buf, p)
            f, wt = key >> 3, key & 7
            if f == 1 and wt == 2:
                n, p = _varint(buf, p)
                tag = bytes(buf[p : p + n]).decode("utf-8")
                p += n
            elif f == 2 and wt == 5:
                if simple_at >= 0:
                    others = True
                simple_at = p
                p += 4
            else:
                others = True
                if wt == 2:
                    n, p = _varint(buf, p)
                    if f == 5:
                        histo = (p, p + n)
                    elif f == 8:
                        tensor = (p, p + n)
                    elif f == 9:
                        meta = (p, p + n)
                    p += n
                else:
                    p = _skip(buf, p, wt)
        if p != e or tag is None:
            raise ValueError("bad Summary.Value")
        if meta is not None:
            plugin = _plugin_name(buf, *meta)
            if plugin:
                run.plugins[tag] = plugin
        if tag == tags.NONFINITE_ORIGIN and tensor is not None:
            text = _tensor_text(buf, *tensor)
            if text:
                run.origins[step] = text
            return None
        if tag == tags.NONFINITE_RANKS and tensor is not None:
            text = _tensor_text(buf, *tensor)
            if text:
                run.ranks[step] = text
            return None
        if tag == GAP_TAG and tensor is not None:
            self.stats.notes.append(f"run {run.name!r}: {_tensor_text(buf, *tensor)}")
            return None
        if tag == tags.MODEL and tensor is not None:
            if run.meta is None:
                text = _tensor_text(buf, *tensor)
                try:
                    meta = json.loads(text) if text else None
                except ValueError:
                    meta = None
                run.meta = meta if isinstance(meta, dict) else None
            return None
        if simple_at >= 0:
            tid = self._tag_id(tag, False)
            self._row(run, step, wall, tid, _F32.unpack_from(buf, simple_at)[0])
            return None if others else (simple_at, tid)
        if histo is not None:
            v = _histo_sumsq(buf, *histo)
            if v is not None:
                self._row(run, step, wall, self._tag_id(tag, True), math.sqrt(v) if v >= 0 else v)
            return None
        if tensor is not None:
            plugin = run.plugins.get(tag, "")
            if plugin in ("", "scalars"):
                v = _tensor_scalar(buf, *tensor, strict=plugin == "scalars")
                if v is not None:
                    self._row(run, step, wall, self._tag_id(tag, False), v)
            elif plugin == "histograms":
                v = _tensor_hist_sumsq(buf, *tensor)
                if v is not None:
                    self._row(
                        run, step, wall, self._tag_id(tag, True), math.sqrt(v) if v >= 0 else v
                    )
        return None

    def _row(self, run: _Run, step: int, wall: float, tid: int, value: float) -> None:
        self.stats.scalars += 1
        run.g_step.append(step)
        run.g_wall.append(wall)
        run.g_tag.append(tid)
        run.g_val.append(value)

    # ---- finishing -------------------------------------------------------------------------
    def _finish(self, name: str, path: str, pieces: list[_Run]) -> RunData:
        t_layer, t_stat, t_comb = self.lut()
        cols = [c for p in pieces for c in p.cols]
        for p in pieces:
            p.cols = []
        meta = next((p.meta for p in pieces if p.meta is not None), None)
        origins = {k: v for p in pieces for k, v in p.origins.items()}
        ranks = {k: v for p in pieces for k, v in p.ranks.items()}
        own = any(p.own for p in pieces)
        if cols:
            step, wall, tid, value = (np.concatenate([c[i] for c in cols]) for i in range(4))
            del cols
        else:
            step = np.empty(0, np.int64)
            wall = np.empty(0, np.float64)
            tid = np.empty(0, np.int32)
            value = np.empty(0, np.float64)
        layer, stat = t_layer[tid], t_stat[tid]
        prio = t_comb[tid]
        comb = prio > 0
        if comb.any():
            keep = ~comb
            cs, cw, cl, ct, cv = _combine(
                step[comb],
                wall[comb],
                layer[comb],
                stat[comb],
                value[comb],
                prio[comb],
                self.stat_codes,
            )
            step = np.concatenate([step[keep], cs])
            wall = np.concatenate([wall[keep], cw])
            layer = np.concatenate([layer[keep], cl])
            stat = np.concatenate([stat[keep], ct])
            value = np.concatenate([value[keep], cv])
        if len(step) > 1 and (np.diff(step) < 0).any():
            order = np.argsort(step, kind="stable")
            step, wall, layer, stat, value = (a[order] for a in (step, wall, layer, stat, value))
        return RunData(name, path, step, wall, layer, stat, value, meta, own, origins, ranks)


def _collide(a: _Run, b: _Run) -> bool:
    """Whether two files of a directory were written at the same time by different monitors:
    overlapping wall times, a tag in common and overlapping steps."""
    return (
        a.wall_lo < b.wall_hi
        and b.wall_lo < a.wall_hi
        and not a.tag_set.isdisjoint(b.tag_set)
        and a.step_lo <= b.step_hi
        and b.step_lo <= a.step_hi
    )


def _size(n: int) -> str:
    """A byte count for people: 512 bytes, 1.2 KiB, 3.4 MiB."""
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n} bytes"  # pragma: no cover


def _combine(step, wall, layer, stat, value, prio, stat_codes: dict[str, int]):
    """Combine rows sharing (step, layer, stat): root-sum-square norms, max, sum, or last.

    Only the rows of the group's first source (lowest `prio`) count, so one parameter logged by
    two schemes is not counted twice."""
    order = np.lexsort((prio, stat, layer, step))
    step, wall, layer, stat, value, prio = (
        a[order] for a in (step, wall, layer, stat, value, prio)
    )
    new = np.ones(len(step), bool)
    new[1:] = (step[1:] != step[:-1]) | (layer[1:] != layer[:-1]) | (stat[1:] != stat[:-1])
    best = prio[np.flatnonzero(new)][np.cumsum(new) - 1]
    if (prio != best).any():
        first = prio == best
        step, wall, layer, stat, value = (a[first] for a in (step, wall, layer, stat, value))
        new = new[first]
    starts = np.flatnonzero(new)
    gid = np.cumsum(new) - 1
    names = {c: n for n, c in stat_codes.items()}
    out = value[np.r_[starts[1:] - 1, len(value) - 1]] if len(value) else value
    out = out.astype(np.float64, copy=True)
    gstat = stat[starts]
    for code in np.unique(gstat):
        how = _COMBINE.get(names[int(code)], "last")
        sel = gstat == code
        rows = sel[gid]
        if how == "rss":
            acc = np.zeros(len(starts))
            np.add.at(acc, gid[rows], value[rows] ** 2)
            out[sel] = np.sqrt(acc[sel])
        elif how == "sum":
            acc = np.zeros(len(starts))
            np.add.at(acc, gid[rows], value[rows])
            out[sel] = acc[sel]
        elif how == "max":
            acc = np.full(len(starts), -np.inf)
            np.maximum.at(acc, gid[rows], value[rows])
            out[sel] = acc[sel]
    gwall = np.full(len(starts), -np.inf)
    np.maximum.at(gwall, gid, wall)
    return step[starts], gwall, layer[starts], gstat, out


# ---- wire-format helpers ---------------------------------------------------------------------
def _varint(buf: bytes, p: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        b = buf[p]
        p += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, p
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip(buf: bytes, p: int, wt: int) -> int:
    if wt == 0:
        return _varint(buf, p)[1]
    if wt == 1:
        return p + 8
    if wt == 2:
        n, p = _varint(buf, p)
        return p + n
    if wt == 5:
        return p + 4
    raise ValueError(f"unsupported wire type {wt}")


def _fields(buf: bytes, s: int, e: int) -> Iterable[tuple[int, int, Any]]:
    """(field, wire type, value) for each field; length-delimited values are (start, end)."""
    p = s
    while p < e:
        key, p = _varint(buf, p)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, p = _varint(buf, p)
        elif wt == 1:
            v = bytes(buf[p : p + 8])
            p += 8
        elif wt == 2:
            n, p = _varint(buf, p)
            v = (p, p + n)
            p += n
        elif wt == 5:
            v = bytes(buf[p : p + 4])
            p += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield f, wt, v
    if p != e:
        raise ValueError("field overruns its message")


def _plugin_name(buf: bytes, s: int, e: int) -> str:
    """SummaryMetadata.plugin_data.plugin_name ('' if absent); data_class SCALAR counts as scalars."""
    name = ""
    for f, wt, v in _fields(buf, s, e):
        if f == 1 and wt == 2:
            for f2, wt2, v2 in _fields(buf, *v):
                if f2 == 1 and wt2 == 2:
                    name = bytes(buf[v2[0] : v2[1]]).decode("utf-8")
        elif f == 4 and wt == 0 and v == 1 and not name:
            name = "scalars"
    return name


_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 9: "<i8", 19: "<f2", 4: "u1", 6: "i1", 5: "<i2"}


def _tensor(buf: bytes, s: int, e: int) -> tuple[int, list[int] | None, np.ndarray | None, list]:
    """(dtype, shape or None, values from tensor_content/typed fields, string_val ranges)."""
    dtype = 0
    shape: list[int] | None = []
    content = None
    vals: list[np.ndarray] = []
    strings = []
    for f, wt, v in _fields(buf, s, e):
        if f == 1 and wt == 0:
            dtype = v
        elif f == 2 and wt == 2:
            for f2, wt2, v2 in _fields(buf, *v):
                if f2 == 2 and wt2 == 2:
                    size = -1
                    for f3, wt3, v3 in _fields(buf, *v2):
                        if f3 == 1 and wt3 == 0:
                            size = v3 - (1 << 64) if v3 >= 1 << 63 else v3
                    shape.append(size)
                elif f2 == 3 and wt2 == 0 and v2:
                    shape = None
        elif f == 4 and wt == 2:
            content = bytes(buf[v[0] : v[1]])
        elif f == 5:
            vals.append(np.frombuffer(bytes(buf[v[0] : v[1]]) if wt == 2 else v, "<f4"))
        elif f == 6:
            vals.append(np.frombuffer(bytes(buf[v[0] : v[1]]) if wt == 2 else v, "<f8"))
        elif f in (7, 10, 13):
            if wt == 2:
                p, q = v
                ints = []
                while p < q:
                    x, p = _varint(buf, p)
                    ints.append(x)
            else:
                ints = [v]
            arr = np.asarray([x - (1 << 64) if x >= 1 << 63 else x for x in ints], np.int64)
            vals.append(arr.astype(np.uint16).view("<f2") if f == 13 else arr)
        elif f == 8 and wt == 2:
            strings.append(v)
    arr = None
    if content is not None and dtype in _DTYPES:
        arr = np.frombuffer(content, _DTYPES[dtype])
    elif vals:
        arr = np.concatenate([np.asarray(a, np.float64) for a in vals])
    return dtype, shape, arr, strings


def _tensor_scalar(buf: bytes, s: int, e: int, strict: bool) -> float | None:
    """A tensor-encoded scalar (TF2 `tf.summary.scalar`), or None if the tensor is not one."""
    dtype, shape, arr, _ = _tensor(buf, s, e)
    if arr is None or arr.size != 1 or dtype not in (1, 2, 19, 3, 9):
        return None
    if not strict and (shape is None or any(d != 1 for d in shape) or dtype not in (1, 2, 19)):
        return None
    return float(arr.reshape(-1)[0])


def _tensor_text(buf: bytes, s: int, e: int) -> str | None:
    _, _, _, strings = _tensor(buf, s, e)
    if not strings:
        return None
    a, b = strings[0]
    return bytes(buf[a:b]).decode("utf-8")


def _histo_sumsq(buf: bytes, s: int, e: int) -> float | None:
    """HistogramProto.sum_squares (field 5, double); NaN/Inf if min, max or sum (fields 1, 2, 4)
    is, since a writer may leave non-finite values out of the sum of squares."""
    out = None
    others = []
    for f, wt, v in _fields(buf, s, e):
        if wt == 1 and f in (1, 2, 4, 5):
            x = _F64.unpack(v)[0]
            if f == 5:
                out = x
            else:
                others.append(x)
    if out is None or not math.isfinite(out):
        return out
    if any(math.isnan(x) for x in others):
        return math.nan
    return math.inf if any(math.isinf(x) for x in others) else out


def _tensor_hist_sumsq(buf: bytes, s: int, e: int) -> float | None:
    """Sum of squares estimated from a TF2 histogram tensor of (left, right, count) rows."""
    _, _, arr, _ = _tensor(buf, s, e)
    if arr is None or arr.size % 3:
        return None
    a = np.asarray(arr, np.float64).reshape(-1, 3)
    centres = (a[:, 0] + a[:, 1]) / 2
    return float(np.sum(a[:, 2] * centres * centres))


# ---- public API -----------------------------------------------------------------------------
def _want_progress(progress: bool | None, total: int) -> bool:
    if progress is not None:
        return bool(progress)
    return (
        total >= _PROGRESS_MIN_BYTES
        and sys.stderr.isatty()
        and "PYTEST_CURRENT_TEST" not in os.environ
    )


def read_logs(
    logdir: str | os.PathLike,
    *,
    run: str | Sequence[str] | None = None,
    steps: str | tuple | slice | None = None,
    tag_pattern: str | None = None,
    progress: bool | None = None,
    chunk_size: int = _CHUNK,
) -> LogData:
    """Read every scalar of the runs under `logdir` into NumPy columns (no pandas import).

    Args, Raises: as `read`; `chunk_size` is the read size in bytes (memory stays within a few
    chunks, plus the output).
    """
    step_range = parse_steps(steps)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 64:
        raise LogReadError(f"Expected `chunk_size` to be an int >= 64, got {chunk_size!r}")
    runs = discover_runs(logdir)
    if run is not None:
        wanted = [run] if isinstance(run, str) else list(run)
        known = {r[0] for r in runs}
        # "RUN#2": the second of the runs concurrent monitors wrote into directory RUN
        dirs = {w if w in known else w.rpartition("#")[0] for w in wanted}
        missing = [w for w in wanted if (w if w in known else w.rpartition("#")[0]) not in known]
        if missing:
            raise LogReadError(
                f"{os.fspath(logdir)}: no run named {missing[0]!r} "
                f"(runs: {', '.join(sorted(known))})"
            )
        runs = [r for r in runs if r[0] in dirs]
    reader = _Reader(tag_pattern, step_range, chunk_size)
    total = 0
    for _, _, files in runs:
        for f in files:
            try:
                total += os.path.getsize(f)
            except OSError:
                pass
    out = []
    if _want_progress(progress, total):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(
            TextColumn("reading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
        ) as prog:
            reader.progress = prog
            reader.task = prog.add_task(os.fspath(logdir), total=total)
            for name, path, files in runs:
                out.extend(reader.read_run(name, path, files))
    else:
        for name, path, files in runs:
            out.extend(reader.read_run(name, path, files))
    if run is not None:
        out = [r for r in out if r.run in wanted or r.run.rpartition("#")[0] in wanted]
    return LogData(
        os.fspath(logdir),
        out,
        list(reader.layers),
        list(reader.stat_codes),
        reader.stats,
        step_range,
    )


def read(
    logdir: str | os.PathLike,
    *,
    run: str | Sequence[str] | None = None,
    steps: str | tuple | slice | None = None,
    tag_pattern: str | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Read every scalar of every run under `logdir` into a long-format DataFrame.

    Every event is read (no sampling), CRCs are checked, corrupt records and truncated tails are
    skipped and counted in ``df.attrs["read_stats"]`` (see `ReadStats`), never raised.

    Args:
        logdir: a TensorBoard log directory (runs are its subdirectories holding event files, the
            directory itself included) or one event file.
        run: only this run (name as in the ``run`` column) or these runs.
        steps: only steps in ``"A:B"`` / ``(A, B)`` / ``slice(A, B)``: A included, B excluded.
        tag_pattern: regex with ``(?P<layer>...)`` and optionally ``(?P<stat>...)`` mapping foreign
            tags (see the module docstring for the built-in mappings).
        progress: show a progress bar (default: on long reads when stderr is a terminal).

    Returns:
        Columns ``run`` (category), ``step`` (int64), ``wall_time`` (float64, seconds since the
        epoch), ``layer`` (category; ``""`` for whole-model values), ``stat`` (category),
        ``value`` (float64). ``df.attrs["meta"]`` maps each graddiag run to its model description.

    Raises:
        LogReadError: if `logdir` is missing or holds no event files, or an argument is malformed.

    Example:
        >>> df = graddiag.read("runs/")  # doctest: +SKIP
        >>> df[df.stat == "grad_norm"].pivot_table("value", "step", "layer")  # doctest: +SKIP
    """
    return read_logs(
        logdir, run=run, steps=steps, tag_pattern=tag_pattern, progress=progress
    ).to_frame()
