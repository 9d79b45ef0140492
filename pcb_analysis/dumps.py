"""Logit dumps: per-proposal records written by `pcbkit dump-logits`, streamed by `pcbkit stats`.

R proposals, K foreground classes; logits [R, K+1], background = column K.

One row per proposal, stored column by column:

    image_ids  [R]          int64    image id of the proposal
    boxes      [R, 4]       float32  proposal box, xyxy, input-image pixels
    logits     [R, K+1]     float16  class logits, background last
    labels     [R]          int32    matched ground truth: -1 ignore, 0..K-1 positive (IoU >= 0.5), K background
    ious       [R]          float32  IoU with the matched ground-truth box (0 when there is none)
    regressed  [R, 4]       float32  optional: class-agnostic regressed box, xyxy
            or [R, K*4]     float32  optional: per-class regressed boxes, class k at [4k:4k+4]

Layout of a dump directory::

    DIR/manifest.json                      merged manifest: what readers open
    DIR/manifest-r{rank:02d}.json          one per writer rank (merged by `merge_manifests`)
    DIR/shard-r{rank:02d}-{idx:05d}/       one complete shard
        image_ids.npy boxes.npy logits.npy labels.npy ious.npy [regressed.npy]
        images.npy                         [I] int64: every image of the shard, also those with 0 rows
        COMPLETE.json                      completion record, written last
    DIR/shard-r{rank:02d}-{idx:05d}.partial/   a shard being written (never read; removed on resume)

Why raw `.npy` columns (the README quotes this paragraph). A dump is written once, appended image
by image, and read sequentially and column-selectively: `pcbkit stats` needs only `logits` and
`labels`, and at K = 1,203 the logits are 98% of the bytes (LVIS v1 val, 20k images x 1,000
proposals: ~48 GB). One plain `.npy` file per column per shard gives exactly that with nothing
beyond numpy: the reader streams a column with sequential `readinto` calls into a reused buffer
(bounded memory, kernel read-ahead, no decode step, and none of the page-cache pages that a
whole-file `mmap` charges to the reader's RSS), while any shard still opens with
`np.load(path, mmap_mode="r")` for ad-hoc work. The writer streams rows straight to disk behind a
fixed 128-byte header that it fills in when the shard closes, so writer memory is one image, not
one shard. safetensors stores the same raw little-endian bytes, but wants every tensor's shape and
offset in a header before the data (a streaming writer must buffer the shard or reserve header
space) and carries no checksum; zarr adds a dependency whose main gain, chunked compression,
buys little on float16 logits (random mantissas barely compress) while costing decode time, and
its many-file stores would still need our own completion protocol. Completion is what makes
dumps resumable and multi-rank safe: a shard is written under `*.partial`, each column file is
fsynced, `COMPLETE.json` (rows, images, per-column dtype, shape, byte size and CRC-32 of the
data) is written last and atomically, and only then is the directory renamed to its final name.
Readers trust only shards listed in the manifest, check every file's header and size when they
open the dump (a truncated shard fails before any row is read), and check CRC-32 and finiteness
while they stream; file reads and CRC-32 run in a prefetch thread that overlaps the caller's
compute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error

if TYPE_CHECKING:
    from pcb_analysis.stats import ClassStats

logger = logging.getLogger(__name__)

FORMAT_NAME = "pcbkit-dump"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMPLETE_NAME = "COMPLETE.json"
PARTIAL_SUFFIX = ".partial"
NPY_HEADER_BYTES = 128  # fixed .npy v1.0 header: magic(6) + version(2) + length(2) + dict padded, 64-aligned
DEFAULT_SHARD_ROWS = 65_536  # ~158 MB of float16 logits per shard at K = 1,203
DEFAULT_CHUNK_ROWS = 8_192  # ~20 MB of float16 logits per chunk at K = 1,203
REGRESSED_KINDS = ("none", "agnostic", "per_class")
# Provenance keys that must agree when a writer resumes a dump or when rank manifests merge:
# mixing rows of two checkpoints or configs would silently corrupt every statistic.
MUST_MATCH_PROVENANCE = ("checkpoint_hash", "config")

_SHARD_RE = re.compile(r"^shard-r(\d{2,})-(\d{5,})$")
_RANK_MANIFEST_RE = re.compile(r"^manifest-r(\d{2,})\.json$")


# --------------------------------------------------------------------------------------------
# schema


@dataclass(frozen=True)
class ColumnSpec:
    """One stored column: file `<name>.npy`, rows of `dtype` with trailing shape `tail`."""

    name: str
    dtype: str  # numpy descr, e.g. "<f2"
    tail: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.tail, dtype=np.int64)))

    @property
    def file(self) -> str:
        return f"{self.name}.npy"


def column_specs(num_classes: int, regressed: str = "none") -> dict[str, ColumnSpec]:
    """The per-row columns of a dump with K = `num_classes` and the given regressed-box kind."""
    if regressed not in REGRESSED_KINDS:
        raise PcbkitError(f"regressed boxes: unknown kind {regressed!r}; expected one of {REGRESSED_KINDS}")
    k = int(num_classes)
    specs = [
        ColumnSpec("image_ids", "<i8", ()),
        ColumnSpec("boxes", "<f4", (4,)),
        ColumnSpec("logits", "<f2", (k + 1,)),
        ColumnSpec("labels", "<i4", ()),
        ColumnSpec("ious", "<f4", ()),
    ]
    if regressed == "agnostic":
        specs.append(ColumnSpec("regressed", "<f4", (4,)))
    elif regressed == "per_class":
        specs.append(ColumnSpec("regressed", "<f4", (4 * k,)))
    return {s.name: s for s in specs}


IMAGES_SPEC = ColumnSpec("images", "<i8", ())  # per-shard image list, not a per-row column


def _npy_header(descr: str, shape: Sequence[int]) -> bytes:
    """A .npy v1.0 header of exactly NPY_HEADER_BYTES bytes (np.load reads it like its own)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    body = text.encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise PcbkitError(f"npy header for shape {tuple(shape)} does not fit {NPY_HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, or a PcbkitError naming it."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported npy version {version}")
            offset = f.tell()
    except (OSError, ValueError) as err:
        raise input_error(path, f"unreadable .npy header ({err})") from err
    if fortran:
        raise input_error(path, "Fortran-ordered array; expected C order")
    return tuple(int(s) for s in shape), np.dtype(dtype), offset


# --------------------------------------------------------------------------------------------
# writer


class _ColumnFile:
    """Stream rows of one column to `<dir>/<name>.npy`; the header is written when it finishes."""

    def __init__(self, directory: Path, spec: ColumnSpec) -> None:
        self.spec = spec
        self.path = directory / spec.file
        self._dtype = np.dtype(spec.dtype)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._f.write(b"\0" * NPY_HEADER_BYTES)
        self.rows = 0
        self.crc = 0

    def append(self, values: np.ndarray) -> None:
        arr = np.ascontiguousarray(values, dtype=self._dtype)
        if arr.size == 0:
            return
        data = memoryview(arr).cast("B")
        self.crc = zlib.crc32(data, self.crc)
        self._f.write(data)
        self.rows += arr.shape[0]

    def finish(self) -> dict[str, Any]:
        shape = (self.rows, *self.spec.tail)
        self._f.seek(0)
        self._f.write(_npy_header(self.spec.dtype, shape))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return {
            "file": self.spec.file,
            "dtype": self.spec.dtype,
            "shape": list(shape),
            "bytes": NPY_HEADER_BYTES + self.rows * self.spec.row_bytes,
            "data_offset": NPY_HEADER_BYTES,
            "crc32": self.crc,
        }

    def abort(self) -> None:
        self._f.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:02d}-{index:05d}"


def rank_manifest_name(rank: int) -> str:
    return f"manifest-r{rank:02d}.json"


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise input_error(path, f"{what} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise input_error(path, f"{what} is not valid JSON ({err.msg} at line {err.lineno})") from err
    except OSError as err:
        raise input_error(path, f"cannot read {what} ({err})") from err
    if not isinstance(data, dict):
        raise input_error(path, f"{what} is not a JSON object")
    return data


def _check_complete_record(shard_dir: Path, specs: Mapping[str, ColumnSpec]) -> dict[str, Any] | None:
    """The shard's completion record if it is present, consistent and every file has its recorded size."""
    try:
        rec = _load_json(shard_dir / COMPLETE_NAME, "completion record")
        cols = rec["columns"]
        rows = int(rec["rows"])
        for name, spec in {**specs, IMAGES_SPEC.name: IMAGES_SPEC}.items():
            c = cols[name]
            expected_rows = int(rec["images"]) if name == IMAGES_SPEC.name else rows
            if c["dtype"] != spec.dtype or list(c["shape"]) != [expected_rows, *spec.tail]:
                return None
            if (shard_dir / c["file"]).stat().st_size != int(c["bytes"]):
                return None
        if set(cols) != set(specs) | {IMAGES_SPEC.name}:
            return None
    except (PcbkitError, KeyError, TypeError, ValueError, OSError):
        return None
    return rec


class DumpWriter:
    """Write one rank's shards of a dump; resumable, and never leaves a half shard that reads as complete.

    Usage (one process, or one per torchrun rank)::

        with DumpWriter(out, categories, "val", provenance, rank=r, world_size=w) as wr:
            for image_id, ... in loader:
                if image_id in wr.done_image_ids:   # resumed run: already in a complete shard
                    continue
                wr.add_image(image_id, boxes, logits, labels, ious)
        # world_size == 1: manifest.json is written by close(); otherwise rank 0 calls
        # merge_manifests(out) after a barrier.

    `logits` [R, K+1] (background last) are stored as float16; values beyond float16's range
    (|z| > 65504) are refused rather than silently stored as inf. Shards close at image
    boundaries once they hold at least `shard_rows` rows, so each image's rows live in one shard.
    Reopening a directory resumes: complete shards of this rank are kept (their images are in
    `done_image_ids`), partial ones are deleted, and new shards continue the numbering.
    """

    def __init__(
        self,
        out_dir: str | Path,
        categories: CategorySpace,
        split: str,
        provenance: Mapping[str, Any] | None = None,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        rank: int = 0,
        world_size: int = 1,
        regressed: str = "none",
        check_finite: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise PcbkitError(f"dump writer: rank {rank} outside world size {world_size}")
        if shard_rows < 1:
            raise PcbkitError(f"dump writer: shard_rows must be >= 1, got {shard_rows}")
        self.out_dir = Path(out_dir)
        self.categories = categories
        self.num_classes = categories.num_classes
        self.split = str(split)
        self.provenance = dict(provenance or {})
        self.shard_rows = int(shard_rows)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.regressed = regressed
        self.check_finite = check_finite
        self.specs = column_specs(self.num_classes, regressed)
        self._shards: list[dict[str, Any]] = []
        self._done: set[int] = set()
        self._open: dict[str, _ColumnFile] | None = None
        self._open_dir: Path | None = None
        self._open_name = ""
        self._open_rows = 0
        self._open_images: list[int] = []
        self._open_image_set: set[int] = set()
        self._next_index = 0
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        self._write_rank_manifest(finished=False)

    # -- resume ---------------------------------------------------------------------------

    def _resume(self) -> None:
        path = self.out_dir / rank_manifest_name(self.rank)
        if path.exists():
            self._check_compatible(_load_json(path, "rank manifest"), path)
        prefix = f"shard-r{self.rank:02d}-"
        removed = 0
        for entry in sorted(self.out_dir.iterdir()):
            if not entry.name.startswith(prefix) or not entry.is_dir():
                continue
            m = _SHARD_RE.match(entry.name)
            rec = _check_complete_record(entry, self.specs) if m else None
            if rec is None:
                shutil.rmtree(entry)
                removed += 1
                continue
            assert m is not None
            self._next_index = max(self._next_index, int(m.group(2)) + 1)
            images = np.load(entry / rec["columns"][IMAGES_SPEC.name]["file"])
            self._done.update(int(i) for i in images)
            self._shards.append(_shard_entry(entry.name, self.rank, rec))
        if removed:
            logger.info("dump %s rank %d: removed %d incomplete shard(s)", self.out_dir, self.rank, removed)
        if self._shards:
            logger.info(
                "dump %s rank %d: resuming after %d complete shard(s), %d image(s) done",
                self.out_dir, self.rank, len(self._shards), len(self._done),
            )

    def _check_compatible(self, old: Mapping[str, Any], path: Path) -> None:
        mine = self._header()
        for key in ("format", "schema_version", "category_hash", "num_classes", "split", "regressed", "world_size"):
            if old.get(key) != mine[key]:
                raise input_error(
                    path,
                    f"cannot resume: field {key!r} is {old.get(key)!r} in the existing dump, {mine[key]!r} now "
                    "(use a new output directory)",
                )
        _check_provenance(old.get("provenance", {}), self.provenance, path, "existing dump")

    # -- writing --------------------------------------------------------------------------

    @property
    def done_image_ids(self) -> frozenset[int]:
        """Image ids held by complete shards of this rank (skip them when resuming)."""
        return frozenset(self._done)

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def add_image(
        self,
        image_id: int,
        boxes: Any,
        logits: Any,
        labels: Any,
        ious: Any,
        regressed: Any = None,
    ) -> None:
        """Append the R proposal rows of one image (R may be 0). Arrays may be numpy or torch.

        boxes [R, 4], logits [R, K+1] (background last), labels [R] in {-1, 0..K-1, K},
        ious [R], regressed [R, 4] or [R, K*4] as chosen at construction (None when "none").
        """
        if self._closed:
            raise PcbkitError("dump writer: add_image after close()")
        image_id = int(image_id)
        if image_id in self._done or image_id in self._open_image_set:
            raise PcbkitError(f"dump writer: image id {image_id} was already written (skip done_image_ids)")
        cols = self._validate(image_id, boxes, logits, labels, ious, regressed)
        if self._open is None:
            self._start_shard()
        assert self._open is not None
        for name, values in cols.items():
            self._open[name].append(values)
        self._open_images.append(image_id)
        self._open_image_set.add(image_id)
        self._open_rows += cols["labels"].shape[0]
        if self._open_rows >= self.shard_rows:
            self._finish_shard()

    def _validate(
        self, image_id: int, boxes: Any, logits: Any, labels: Any, ious: Any, regressed: Any
    ) -> dict[str, np.ndarray]:
        k = self.num_classes
        where = f"dump writer, image {image_id}"
        z = _to_numpy(logits)
        if z.ndim != 2 or z.shape[1] != k + 1:
            raise PcbkitError(f"{where}: logits must be [R, K+1] = [R, {k + 1}], got {list(z.shape)}")
        r = z.shape[0]
        b = _to_numpy(boxes).astype(np.float32, copy=False)
        y = _to_numpy(labels)
        u = _to_numpy(ious).astype(np.float32, copy=False)
        if b.shape != (r, 4):
            raise PcbkitError(f"{where}: boxes must be [R, 4] = [{r}, 4], got {list(b.shape)}")
        if y.shape != (r,) or (r and not np.issubdtype(y.dtype, np.integer)):
            raise PcbkitError(f"{where}: labels must be integer [R] = [{r}], got {y.dtype} {list(y.shape)}")
        if r and (y.min() < -1 or y.max() > k):
            raise PcbkitError(f"{where}: labels must lie in -1..{k} (-1 ignore, {k} background)")
        if u.shape != (r,):
            raise PcbkitError(f"{where}: ious must be [R] = [{r}], got {list(u.shape)}")
        with np.errstate(over="ignore", invalid="ignore"):
            z16 = z.astype(np.float16)
        if self.check_finite and r and not np.isfinite(z16).all():
            bad = "NaN/inf" if not np.isfinite(z).all() else f"|logit| > {np.finfo(np.float16).max:g} (float16 range)"
            raise PcbkitError(f"{where}: logits contain {bad}")
        cols = {
            "image_ids": np.full(r, image_id, dtype=np.int64),
            "boxes": b,
            "logits": z16,
            "labels": y.astype(np.int32),
            "ious": u,
        }
        if self.regressed == "none":
            if regressed is not None:
                raise PcbkitError(f"{where}: regressed boxes given but the writer was built with regressed='none'")
        else:
            if regressed is None:
                raise PcbkitError(f"{where}: regressed boxes required (writer built with regressed={self.regressed!r})")
            g = _to_numpy(regressed).astype(np.float32, copy=False)
            width = self.specs["regressed"].tail[0]
            if g.shape != (r, width):
                raise PcbkitError(f"{where}: regressed must be [R, {width}], got {list(g.shape)}")
            cols["regressed"] = g
        return cols

    def _start_shard(self) -> None:
        self._open_name = shard_name(self.rank, self._next_index)
        self._next_index += 1
        self._open_dir = self.out_dir / (self._open_name + PARTIAL_SUFFIX)
        if self._open_dir.exists():
            shutil.rmtree(self._open_dir)
        self._open_dir.mkdir()
        self._open = {name: _ColumnFile(self._open_dir, spec) for name, spec in self.specs.items()}
        self._open_rows = 0
        self._open_images = []
        self._open_image_set = set()

    def _finish_shard(self) -> None:
        assert self._open is not None and self._open_dir is not None
        columns = {name: cf.finish() for name, cf in self._open.items()}
        images = _ColumnFile(self._open_dir, IMAGES_SPEC)
        images.append(np.asarray(self._open_images, dtype=np.int64))
        columns[IMAGES_SPEC.name] = images.finish()
        rec = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "shard": self._open_name,
            "rank": self.rank,
            "rows": self._open_rows,
            "images": len(self._open_images),
            "columns": columns,
        }
        write_json_atomic(self._open_dir / COMPLETE_NAME, rec, indent=1)
        final = self.out_dir / self._open_name
        os.replace(self._open_dir, final)
        _fsync_dir(self.out_dir)
        self._shards.append(_shard_entry(self._open_name, self.rank, rec))
        self._done.update(self._open_images)
        self._open = None
        self._open_dir = None
        self._open_images = []
        self._open_image_set = set()
        self._open_rows = 0
        self._write_rank_manifest(finished=False)
        logger.debug("dump %s: shard %s complete (%d rows)", self.out_dir, final.name, rec["rows"])

    def _abort_shard(self) -> None:
        if self._open is None:
            return
        for cf in self._open.values():
            cf.abort()
        if self._open_dir is not None:
            shutil.rmtree(self._open_dir, ignore_errors=True)
        self._open = None
        self._open_dir = None

    # -- manifests ------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "category_hash": self.categories.hash,
            "num_classes": self.num_classes,
            "background_index": self.num_classes,
            "split": self.split,
            "regressed": self.regressed,
            "columns": {n: {"dtype": s.dtype, "tail": list(s.tail)} for n, s in self.specs.items()},
            "world_size": self.world_size,
            "provenance": self.provenance,
            "categories": self.categories.to_dict(),
        }

    def _write_rank_manifest(self, finished: bool) -> None:
        """Rewrite this rank's manifest (and, with one rank, manifest.json) to list the complete shards."""
        shards = sorted(self._shards, key=lambda s: s["name"])
        manifest = {
            **self._header(),
            "rank": self.rank,
            "finished": finished,
            "num_rows": sum(s["rows"] for s in shards),
            "num_images": sum(s["images"] for s in shards),
            "shards": shards,
        }
        write_json_atomic(self.out_dir / rank_manifest_name(self.rank), manifest, indent=1)
        if self.world_size == 1:
            # One rank cannot hold an image twice (add_image refuses it): no duplicate scan needed.
            write_json_atomic(self.out_dir / MANIFEST_NAME, _merged(manifest, shards, 1, finished), indent=1)

    def close(self) -> None:
        """Finish the open shard and mark this rank finished (with one rank, manifest.json too)."""
        if self._closed:
            return
        if self._open is not None:
            self._finish_shard()
        self._write_rank_manifest(finished=True)
        self._closed = True

    def abort(self) -> None:
        """Drop the open shard; complete shards stay listed, so a rerun resumes after them."""
        if self._closed:
            return
        self._abort_shard()
        self._write_rank_manifest(finished=False)
        self._closed = True

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _shard_entry(name: str, rank: int, rec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "rank": rank,
        "rows": int(rec["rows"]),
        "images": int(rec["images"]),
        "columns": rec["columns"],
    }


def _check_provenance(old: Mapping[str, Any], new: Mapping[str, Any], path: Path, what: str) -> None:
    for key in MUST_MATCH_PROVENANCE:
        if key in old and key in new and old[key] != new[key]:
            raise input_error(path, f"provenance {key!r} differs from the {what} ({old[key]!r} vs {new[key]!r})")
    differing = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if differing:
        logger.warning("%s: provenance field(s) %s differ from the %s", path, differing, what)


# --------------------------------------------------------------------------------------------
# merge


def _merged(header: Mapping[str, Any], shards: list[dict[str, Any]], world_size: int, finished: bool) -> dict[str, Any]:
    """The merged manifest: a rank manifest's header, all ranks' shards, totals and the finished flag."""
    manifest = {k: v for k, v in header.items() if k not in ("rank", "finished", "shards", "num_rows", "num_images")}
    manifest.update(
        {
            "world_size": world_size,
            "ranks": list(range(world_size)),
            "finished": finished,
            "num_rows": sum(int(s["rows"]) for s in shards),
            "num_images": sum(int(s["images"]) for s in shards),
            "shards": shards,
        }
    )
    return manifest


def merge_manifests(
    dump_dir: str | Path, world_size: int | None = None, allow_unfinished: bool = False
) -> dict[str, Any]:
    """Combine the rank manifests of `dump_dir` into `manifest.json` (atomically) and return it.

    Call it once, on one process, after every rank closed its writer (torchrun: a barrier, then
    rank 0). All ranks 0..W-1 must be present with the same schema, category space, split and
    checkpoint. Unless `allow_unfinished`, every rank must have finished (closed its writer);
    with it, the result lists the complete shards so far and is marked `"finished": false`.
    An image id present in two shards (for example from torch's DistributedSampler padding,
    which repeats images to even out ranks) is refused: every statistic would count it twice;
    split the image list across ranks without padding instead.
    """
    dump_dir = Path(dump_dir)
    found = {}
    for entry in sorted(dump_dir.glob("manifest-r*.json")):
        m = _RANK_MANIFEST_RE.match(entry.name)
        if m:
            found[int(m.group(1))] = _load_json(entry, "rank manifest")
    if not found:
        raise input_error(dump_dir, "no rank manifests (manifest-rNN.json): nothing was written here")
    first = found[min(found)]
    w = int(world_size if world_size is not None else first.get("world_size", len(found)))
    missing = [r for r in range(w) if r not in found]
    if missing:
        raise input_error(dump_dir, f"rank manifest(s) missing for rank(s) {missing} of world size {w}")
    extra = sorted(r for r in found if r >= w)
    if extra:
        raise input_error(dump_dir, f"rank manifest(s) for rank(s) {extra} beyond world size {w}")
    shards: list[dict[str, Any]] = []
    finished = True
    for r in range(w):
        man = found[r]
        path = dump_dir / rank_manifest_name(r)
        if not man.get("finished"):
            if not allow_unfinished:
                raise input_error(path, "rank did not finish (field 'finished' is false): rerun the dump to resume it")
            finished = False
        for key in ("format", "schema_version", "category_hash", "num_classes", "split", "regressed", "columns"):
            if man.get(key) != first.get(key):
                raise input_error(path, f"field {key!r} is {man.get(key)!r}, rank {min(found)} has {first.get(key)!r}")
        _check_provenance(first.get("provenance", {}), man.get("provenance", {}), path, f"rank {min(found)}")
        shards.extend(man.get("shards", []))
    shards.sort(key=lambda s: s["name"])
    seen: dict[int, str] = {}
    for s in shards:
        images = np.load(dump_dir / s["name"] / s["columns"][IMAGES_SPEC.name]["file"])
        for i in images.tolist():
            if i in seen:
                raise input_error(
                    dump_dir,
                    f"image id {i} is in both {seen[i]} and {s['name']} (DistributedSampler padding?): "
                    "each image must be dumped by exactly one rank",
                )
            seen[i] = s["name"]
    manifest = _merged(first, shards, w, finished)
    write_json_atomic(dump_dir / MANIFEST_NAME, manifest, indent=1)
    return manifest


# --------------------------------------------------------------------------------------------
# reader


@dataclass(frozen=True)
class ShardInfo:
    """One listed shard: its rows, images, column records (manifest) and .npy data offsets."""

    name: str
    rows: int
    images: int
    columns: dict[str, dict[str, Any]]
    offsets: dict[str, int]


class _Stopped(Exception):
    """The consumer of a prefetching reader went away."""


class Chunk(dict):
    """A dict column name -> array [n, ...] for rows `start .. start+n` of shard `shard`."""

    def __init__(self, arrays: Mapping[str, Any], shard: str, start: int) -> None:
        super().__init__(arrays)
        self.shard = shard
        self.start = start


class DumpReader:
    """Open a dump directory, validate its manifest and files, and stream its rows in bounded memory.

    Checks on open (before any row is read): manifest present, writer finished (or
    `allow_unfinished`: then only the complete shards are read), format and schema version, category
    space consistent with its hash and with `expected_categories`, K and logits width consistent
    with `expected_num_classes`, every listed shard present with the recorded .npy header and byte
    size (a truncated shard is named). While streaming: CRC-32 of every column read (a corrupted
    shard is named once its last chunk is read, before the next shard starts), logits finite
    (NaN/inf named with shard, row and image id), labels within -1..K.
    """

    def __init__(
        self,
        dump_dir: str | Path,
        expected_categories: CategorySpace | None = None,
        expected_num_classes: int | None = None,
        allow_unfinished: bool = False,
    ) -> None:
        self.dump_dir = Path(dump_dir)
        path = self.dump_dir / MANIFEST_NAME
        if not self.dump_dir.is_dir():
            raise input_error(self.dump_dir, "dump directory not found")
        if not path.is_file():
            ranks = sorted(self.dump_dir.glob("manifest-r*.json"))
            hint = (
                " (rank manifests exist: the dump was not merged or not finished; rerun it to resume)"
                if ranks
                else " (not a pcbkit dump)"
            )
            raise input_error(path, "manifest not found" + hint)
        man = _load_json(path, "manifest")
        self.manifest = man
        if man.get("format") != FORMAT_NAME:
            raise input_error(path, f"field 'format' is {man.get('format')!r}, expected {FORMAT_NAME!r}")
        if man.get("schema_version") != SCHEMA_VERSION:
            raise input_error(
                path, f"field 'schema_version' is {man.get('schema_version')!r}; this pcbkit reads {SCHEMA_VERSION}"
            )
        if "categories" not in man:
            raise input_error(path, "field 'categories' missing")
        self.categories = CategorySpace.from_dict(man["categories"], source=path)
        if man.get("category_hash") != self.categories.hash:
            raise input_error(
                path, f"field 'category_hash' {man.get('category_hash')!r} does not match 'categories' ({self.categories.hash})"
            )
        k = self.categories.num_classes
        if man.get("num_classes") != k or man.get("background_index") != k:
            raise input_error(
                path,
                f"fields 'num_classes'={man.get('num_classes')!r} / 'background_index'={man.get('background_index')!r} "
                f"disagree with the category space (K={k})",
            )
        if expected_categories is not None and expected_categories.hash != self.categories.hash:
            raise input_error(
                path,
                f"category space mismatch: dump has hash {self.categories.hash} (K={k}), expected hash "
                f"{expected_categories.hash} (K={expected_categories.num_classes})",
            )
        if expected_num_classes is not None and expected_num_classes != k:
            raise input_error(path, f"dump has K={k} classes, expected K={expected_num_classes}")
        self.num_classes = k
        self.split = str(man.get("split", ""))
        self.provenance: dict[str, Any] = dict(man.get("provenance", {}))
        self.regressed = str(man.get("regressed", "none"))
        try:
            self.specs = column_specs(k, self.regressed)
        except PcbkitError as err:
            raise input_error(path, f"field 'regressed': {err}") from err
        self.shards = [self._check_shard(s, path) for s in man.get("shards", [])]
        self.num_rows = sum(s.rows for s in self.shards)
        self.num_images = sum(s.images for s in self.shards)
        if man.get("num_rows") is not None and man["num_rows"] != self.num_rows:
            raise input_error(path, f"field 'num_rows' is {man['num_rows']}, its shards hold {self.num_rows}")
        self.finished = bool(man.get("finished", False))
        if not self.finished:
            msg = (
                f"dump is unfinished (the writer stopped or is still running): {len(self.shards)} complete "
                f"shard(s), {self.num_images} image(s); rerun the dump to resume it"
            )
            if not allow_unfinished:
                raise input_error(path, msg)
            logger.warning("%s: %s; reading the complete shards only", path, msg)

    def _check_shard(self, entry: Mapping[str, Any], manifest_path: Path) -> ShardInfo:
        try:
            name = str(entry["name"])
            rows = int(entry["rows"])
            images = int(entry["images"])
            columns = dict(entry["columns"])
        except (KeyError, TypeError, ValueError) as err:
            raise input_error(manifest_path, f"malformed shard entry ({err!r})") from err
        shard_dir = self.dump_dir / name
        if not _SHARD_RE.match(name) or not shard_dir.is_dir():
            raise input_error(shard_dir, "shard listed in the manifest is missing")
        offsets: dict[str, int] = {}
        for col, spec in {**self.specs, IMAGES_SPEC.name: IMAGES_SPEC}.items():
            n = images if col == IMAGES_SPEC.name else rows
            rec = columns.get(col)
            if rec is None:
                raise input_error(shard_dir, f"column {col!r} missing from the manifest entry")
            if rec.get("file") != spec.file:
                raise input_error(shard_dir, f"column {col!r}: file {rec.get('file')!r}, expected {spec.file!r}")
            fpath = shard_dir / spec.file
            if not fpath.is_file():
                raise input_error(fpath, f"shard {name}: column file missing")
            size = fpath.stat().st_size
            if size != int(rec.get("bytes", -1)):
                raise input_error(
                    fpath, f"shard {name} is truncated or altered: {size} bytes, manifest records {rec.get('bytes')}"
                )
            shape, dtype, offset = _read_npy_header(fpath)
            if shape != (n, *spec.tail) or dtype != np.dtype(spec.dtype):
                raise input_error(
                    fpath, f"shard {name}: header says {dtype.str} {list(shape)}, expected {spec.dtype} {[n, *spec.tail]}"
                )
            if size != offset + n * spec.row_bytes:
                raise input_error(fpath, f"shard {name} is truncated: {size} bytes for {n} rows")
            offsets[col] = offset
        return ShardInfo(name=name, rows=rows, images=images, columns=columns, offsets=offsets)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def image_ids(self) -> np.ndarray:
        """All image ids of the dump (also those with no rows), in shard order. [I] int64."""
        parts = [np.load(self.dump_dir / s.name / s.columns[IMAGES_SPEC.name]["file"]) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def iter_chunks(
        self,
        rows: int = DEFAULT_CHUNK_ROWS,
        columns: Iterable[str] | None = None,
        *,
        verify: bool = True,
        as_torch: bool = False,
        reuse_buffers: bool = False,
        prefetch: int = 2,
    ) -> Iterator[Chunk]:
        """Yield `Chunk`s of at most `rows` rows (never spanning two shards), in shard order.

        columns: names to read (default all); only those files are touched. verify: check CRC-32
        of the columns read (a mismatch raises once the shard's last chunk has been yielded, before
        the next shard), finite logits and the label range (checked before a chunk is yielded).
        as_torch: yield torch tensors (zero-copy views of the numpy arrays). reuse_buffers: refill a
        small pool of buffers, so a chunk's arrays are valid only until the next chunk is requested
        (fastest). prefetch: chunks read ahead by a background thread (file reads and CRC-32 run
        there, overlapping the caller's compute; 0 reads inline). Errors surface in row order either way.
        Memory: at most prefetch + 2 chunks of the requested columns, whatever the dump size.
        """
        if rows < 1:
            raise PcbkitError(f"iter_chunks: rows must be >= 1, got {rows}")
        names = list(self.specs) if columns is None else list(columns)
        unknown = [c for c in names if c not in self.specs]
        if unknown:
            raise PcbkitError(f"{self.dump_dir}: unknown column(s) {unknown}; this dump has {list(self.specs)}")

        def alloc() -> dict[str, np.ndarray]:
            return {c: np.empty((rows, *self.specs[c].tail), dtype=self.specs[c].dtype) for c in names}

        if prefetch <= 0:
            shared = alloc() if reuse_buffers else None
            source: Iterator[tuple[Chunk, Any]] = self._raw_chunks(names, rows, verify, lambda: shared)
            for chunk, _ in source:
                yield self._finish_chunk(chunk, verify, as_torch)
            return

        # Background reader: fills buffer sets taken from `free`, hands chunks over through `ready`
        # (bounded), and forwards its exception in order. The consumer releases a buffer set when
        # it asks for the next chunk.
        ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=prefetch)
        free: queue.Queue[dict[str, np.ndarray]] = queue.Queue()
        stop = threading.Event()
        if reuse_buffers:
            for _ in range(prefetch + 2):
                free.put(alloc())

        def acquire() -> dict[str, np.ndarray] | None:
            if not reuse_buffers:
                return None
            while True:
                try:
                    return free.get(timeout=0.05)
                except queue.Empty:
                    if stop.is_set():
                        raise _Stopped from None

        def put(item: tuple[str, Any]) -> None:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return
                except queue.Full:
                    continue
            raise _Stopped

        def produce() -> None:
            try:
                for item in self._raw_chunks(names, rows, verify, acquire):
                    put(("chunk", item))
                put(("end", None))
            except _Stopped:
                pass
            except BaseException as err:  # forwarded to the consumer, raised there in order
                with contextlib.suppress(_Stopped):
                    put(("error", err))

        thread = threading.Thread(target=produce, name="pcbkit-dump-reader", daemon=True)
        thread.start()
        held: dict[str, np.ndarray] | None = None
        try:
            while True:
                kind, payload = ready.get()
                if held is not None:
                    free.put(held)
                    held = None
                if kind == "end":
                    break
                if kind == "error":
                    raise payload
                chunk, held = payload
                yield self._finish_chunk(chunk, verify, as_torch)
        finally:
            stop.set()
            thread.join()

    def _raw_chunks(
        self, names: list[str], rows: int, verify: bool, acquire: Any
    ) -> Iterator[tuple[Chunk, dict[str, np.ndarray] | None]]:
        """Read chunks (and CRC-32 them); `acquire()` gives a buffer set to fill or None to allocate."""
        for shard in self.shards:
            if shard.rows == 0:
                continue
            files = {}
            try:
                for c in names:
                    f = open(self.dump_dir / shard.name / shard.columns[c]["file"], "rb", buffering=0)  # noqa: SIM115
                    f.seek(shard.offsets[c])
                    files[c] = f
                crcs = dict.fromkeys(names, 0)
                for start in range(0, shard.rows, rows):
                    n = min(rows, shard.rows - start)
                    bufs = acquire()
                    arrays: dict[str, Any] = {}
                    for c in names:
                        spec = self.specs[c]
                        arr = bufs[c][:n] if bufs is not None else np.empty((n, *spec.tail), dtype=spec.dtype)
                        view = memoryview(arr).cast("B")
                        _read_exact(files[c], view, self.dump_dir / shard.name / spec.file)
                        if verify:
                            crcs[c] = zlib.crc32(view, crcs[c])
                        arrays[c] = arr
                    yield Chunk(arrays, shard.name, start), bufs
                if verify:
                    for c in names:
                        if crcs[c] != int(shard.columns[c]["crc32"]):
                            raise input_error(
                                self.dump_dir / shard.name / shard.columns[c]["file"],
                                f"shard {shard.name} is corrupted: CRC-32 of column {c!r} is {crcs[c]}, "
                                f"recorded {shard.columns[c]['crc32']}",
                            )
            finally:
                for f in files.values():
                    f.close()

    def _finish_chunk(self, chunk: Chunk, verify: bool, as_torch: bool) -> Chunk:
        if verify:
            self._check_chunk(chunk, chunk.shard, chunk.start)
        if as_torch:
            return Chunk({c: torch.from_numpy(a) for c, a in chunk.items()}, chunk.shard, chunk.start)
        return chunk

    def _check_chunk(self, arrays: Mapping[str, np.ndarray], shard: str, start: int) -> None:
        z = arrays.get("logits")
        if z is not None and len(z):
            lo, hi = torch.aminmax(torch.from_numpy(z))
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                bad = np.flatnonzero(~np.isfinite(z).all(axis=1))
                row = start + int(bad[0])
                image = self._image_of_row(shard, row, arrays, start)
                raise input_error(
                    self.dump_dir / shard / "logits.npy",
                    f"shard {shard}: logits contain NaN/inf ({len(bad)} row(s) in this chunk; first at row {row}"
                    f"{image})",
                )
        y = arrays.get("labels")
        if y is not None and len(y):
            lo_y, hi_y = int(y.min()), int(y.max())
            if lo_y < -1 or hi_y > self.num_classes:
                raise input_error(
                    self.dump_dir / shard / "labels.npy",
                    f"shard {shard}: labels outside -1..{self.num_classes} (min {lo_y}, max {hi_y})",
                )

    def _image_of_row(self, shard: str, row: int, arrays: Mapping[str, np.ndarray], start: int) -> str:
        ids = arrays.get("image_ids")
        if ids is not None:
            return f", image {int(ids[row - start])}"
        info = next(s for s in self.shards if s.name == shard)
        rec = info.columns["image_ids"]
        ids_all = np.load(self.dump_dir / shard / rec["file"], mmap_mode="r")
        return f", image {int(ids_all[row])}"

    def verify(self, progress: bool = False) -> None:
        """Read every column of every shard once, checking CRC-32, finite logits and labels."""
        from tqdm import tqdm

        with tqdm(total=self.num_rows, unit="row", unit_scale=True, disable=not progress, desc="verify") as bar:
            for chunk in self.iter_chunks(reuse_buffers=True):
                bar.update(len(chunk["labels"]))


def _read_exact(f: Any, view: memoryview, path: Path) -> None:
    got = 0
    total = len(view)
    while got < total:
        n = f.readinto(view[got:])
        if not n:
            raise input_error(path, f"unexpected end of file ({got} of {total} bytes of a chunk): shard truncated")
        got += n


# --------------------------------------------------------------------------------------------
# statistics from a dump


def stats_from_dump(
    dump_dir: str | Path | DumpReader,
    expected_categories: CategorySpace | None = None,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    split: str | None = None,
) -> ClassStats:
    """Stream a dump through `ClassStats.update` (S, n, H over the positive proposals, docs/method.md §2).

    `dump_dir` may be an open `DumpReader` (e.g. one opened with `allow_unfinished=True`).
    Reads only the `labels` and `logits` columns, chunk by chunk into reused buffers (peak memory
    a few chunks, independent of the dump size), with a tqdm bar (rows/s, ETA). The reader has
    already checked CRC-32, the label range and finiteness of every row (background and ignored
    rows too), so `update` skips its own full finiteness scan. The result carries `categories`,
    `source` (the dump directory), `split` (the manifest's unless `split` is given) and the row
    counts (`rows`, `background`, `ignored`).
    """
    from tqdm import tqdm

    from pcb_analysis.stats import ClassStats

    if isinstance(dump_dir, DumpReader):
        reader = dump_dir
        if expected_categories is not None:
            expected_categories.check_same(reader.categories, str(reader.dump_dir / MANIFEST_NAME))
    else:
        reader = DumpReader(dump_dir, expected_categories=expected_categories)
    k = reader.num_classes
    if reader.num_rows == 0:
        raise input_error(reader.dump_dir / MANIFEST_NAME, "dump holds no proposal rows")
    st = ClassStats.zeros(
        k, categories=reader.categories, source=str(reader.dump_dir), split=split if split is not None else reader.split
    )
    with tqdm(
        total=reader.num_rows, unit="row", unit_scale=True, disable=not progress, desc="stats", mininterval=0.5
    ) as bar:
        for chunk in reader.iter_chunks(chunk_rows, columns=("logits", "labels"), reuse_buffers=True):
            labels = chunk["labels"]
            st.update(
                torch.from_numpy(chunk["logits"]),
                torch.from_numpy(labels),
                source=f"{reader.dump_dir / chunk.shard}",
                check_finite_logits=False,
            )
            bar.update(len(labels))
    if int(st.n.sum()) == 0:
        logger.warning("%s: no positive proposals (labels 0..K-1) in %d rows", reader.dump_dir, st.rows)
    return st
