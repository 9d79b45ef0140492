"""DumpWriter: append one rank's proposal rows to a dump, shard by shard (docs/dumps.md §2, §4).

Input per image: boxes [R, 4], logits [R, K+1] (background last; stored float16, |z| > 65504
refused), labels [R] in {-1, 0..K-1, K}, ious [R], optional regressed [R, 4] or [R, K*4].
A shard is written under `shard-rNN-IIIII.partial/`, every column file fsynced, `COMPLETE.json`
written last and atomically, then renamed to its final name and listed in the rank manifest:
a crash never leaves a half shard that reads as complete. Reopening the directory resumes after
the complete shards (`done_image_ids`), re-checking their CRC-32 (a damaged one is redone) and the
run identity they carry (another run's is refused). Column files stream behind a fixed 128-byte
.npy header filled in when the shard closes (writer memory: one image).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcb_analysis.atomic import os_errors_named, write_json_atomic
from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps.format import (
    COMPLETE_NAME,
    DEFAULT_SHARD_ROWS,
    FORMAT_NAME,
    IMAGES_SPEC,
    MANIFEST_NAME,
    NPY_HEADER_BYTES,
    PARTIAL_SUFFIX,
    SCHEMA_VERSION,
    SHARD_RE,
    ColumnSpec,
    column_specs,
    complete_record,
    damaged_column,
    dump_identity,
    identity_difference,
    load_json_object,
    npy_header,
    rank_manifest_name,
    shard_name,
)
from pcb_analysis.dumps.manifest import check_provenance, merged_manifest, shard_entry
from pcb_analysis.errors import PcbkitError, input_error

logger = logging.getLogger(__name__)

# Header fields that must not change when a writer reopens (resumes) a dump directory.
_RESUME_KEYS = (
    "format", "schema_version", "category_hash", "num_classes", "split", "regressed", "world_size"
)

class _ColumnFile:
    """Stream rows of one column to `<dir>/<name>.npy`; the header is written when it finishes."""

    def __init__(self, directory: Path, spec: ColumnSpec) -> None:
        self.spec = spec
        self.path = directory / spec.file
        self._dtype = np.dtype(spec.dtype)
        with os_errors_named(self.path):  # a full disk names the shard file (docs/dumps.md)
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
        with os_errors_named(self.path):
            self._f.write(data)
        self.rows += arr.shape[0]

    def finish(self) -> dict[str, Any]:
        shape = (self.rows, *self.spec.tail)
        with os_errors_named(self.path):
            self._f.seek(0)
            self._f.write(npy_header(self.spec.dtype, shape))
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
        # already failing (e.g. the disk is full): the shard is discarded anyway
        with contextlib.suppress(OSError):
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
    `done_image_ids`), partial ones and those failing their CRC-32 are deleted (their images are
    written again), and new shards continue the numbering. A resume is refused when a shard carries
    another run's identity (checkpoint, ground truth, config: `dump_identity`), or when the dump holds
    images outside `image_ids` (the images this run may write; None: no check).
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
        image_ids: Iterable[int] | None = None,
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
        self.identity = dump_identity(self.provenance)
        self._allowed = None if image_ids is None else {int(i) for i in image_ids}
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
        old: dict[str, Any] = {}
        if path.exists():
            old = load_json_object(path, "rank manifest")
            self._check_compatible(old, path)
        prefix = f"shard-r{self.rank:02d}-"
        removed = damaged = 0
        for entry in sorted(self.out_dir.iterdir()):
            if not entry.name.startswith(prefix) or not entry.is_dir():
                continue
            m = SHARD_RE.match(entry.name)
            rec = complete_record(entry, self.specs) if m else None
            if rec is None:
                shutil.rmtree(entry)
                removed += 1
                continue
            assert m is not None
            foreign = identity_difference(rec.get("identity"), self.identity)
            if foreign is not None:
                raise input_error(
                    entry, f"cannot resume: shard {foreign}; remove it or use a new output directory"
                )
            bad = damaged_column(entry, rec)
            if bad is not None:  # its images are dumped again, into a new shard
                logger.warning(
                    "dump %s: shard %s fails the CRC-32 of column %r: removed, its images are dumped again",
                    self.out_dir, entry.name, bad,
                )
                shutil.rmtree(entry)
                damaged += 1
                continue
            self._next_index = max(self._next_index, int(m.group(2)) + 1)
            images = np.load(entry / rec["columns"][IMAGES_SPEC.name]["file"])
            self._done.update(int(i) for i in images)
            self._shards.append(shard_entry(entry.name, self.rank, rec))
        beyond = sorted(self._done - self._allowed) if self._allowed is not None else []
        if beyond:
            old_prov = old.get("provenance")
            started = old_prov.get("max_images") if isinstance(old_prov, dict) else None
            raise input_error(
                self.out_dir,
                f"cannot resume: the dump already holds {len(beyond)} image(s) that this run would not "
                f"dump (e.g. image id {beyond[0]}; it was started with max_images={started}): rerun with "
                "the images it was started with, or use a new output directory",
            )
        if removed:
            logger.info("dump %s rank %d: removed %d incomplete shard(s)", self.out_dir, self.rank, removed)
        if damaged:
            logger.warning(
                "dump %s rank %d: %d damaged shard(s) will be rewritten", self.out_dir, self.rank, damaged
            )
        if self._shards:
            logger.info(
                "dump %s rank %d: resuming after %d complete shard(s), %d image(s) done",
                self.out_dir, self.rank, len(self._shards), len(self._done),
            )

    def _check_compatible(self, old: Mapping[str, Any], path: Path) -> None:
        mine = self._header()
        for key in _RESUME_KEYS:
            if old.get(key) != mine[key]:
                raise input_error(
                    path,
                    f"cannot resume: field {key!r} is {old.get(key)!r} in the existing dump, "
                    f"{mine[key]!r} now "
                    "(use a new output directory)",
                )
        check_provenance(old.get("provenance", {}), self.provenance, path, "existing dump")

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
            too_big = f"|logit| > {np.finfo(np.float16).max:g} (float16 range)"
            bad = "NaN/inf" if not np.isfinite(z).all() else too_big
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
                raise PcbkitError(
                    f"{where}: regressed boxes given but the writer was built with regressed='none'"
                )
        else:
            if regressed is None:
                raise PcbkitError(
                    f"{where}: regressed boxes required (writer built with regressed={self.regressed!r})"
                )
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
            "identity": self.identity,
        }
        write_json_atomic(self._open_dir / COMPLETE_NAME, rec, indent=1)
        final = self.out_dir / self._open_name
        os.replace(self._open_dir, final)
        _fsync_dir(self.out_dir)
        self._shards.append(shard_entry(self._open_name, self.rank, rec))
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
            "identity": self.identity,
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
            merged = merged_manifest(manifest, shards, 1, finished)
            write_json_atomic(self.out_dir / MANIFEST_NAME, merged, indent=1)

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
