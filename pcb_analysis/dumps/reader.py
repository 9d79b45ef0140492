"""DumpReader: open a dump, validate it, and stream its rows column-selectively (docs/dumps.md §3, §5).

Only shards listed in `manifest.json` are read. On open: format, schema, category space (against
its hash and `expected_categories`), K, every shard's .npy header and byte size (a truncated shard
fails before any row is read) and identity (a shard of another run is refused). While streaming
`Chunk`s (dict column -> array [n, ...], rows `start .. start+n` of one shard): CRC-32 of each
column read, finite logits, labels in -1..K. File reads and CRC-32 run in a prefetch thread; with
`reuse_buffers`, memory stays at a few chunks whatever the dump size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps.format import (
    COMPLETE_NAME,
    DEFAULT_CHUNK_ROWS,
    FORMAT_NAME,
    IMAGES_SPEC,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_RE,
    column_specs,
    identity_difference,
    load_json_object,
    read_npy_header,
)
from pcb_analysis.errors import PcbkitError, input_error

logger = logging.getLogger(__name__)

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
        man = load_json_object(path, "manifest")
        self.manifest = man
        if man.get("format") != FORMAT_NAME:
            raise input_error(path, f"field 'format' is {man.get('format')!r}, expected {FORMAT_NAME!r}")
        if man.get("schema_version") != SCHEMA_VERSION:
            raise input_error(
                path,
                f"field 'schema_version' is {man.get('schema_version')!r}; "
                f"this pcbkit reads {SCHEMA_VERSION}",
            )
        if "categories" not in man:
            raise input_error(path, "field 'categories' missing")
        self.categories = CategorySpace.from_dict(man["categories"], source=path)
        if man.get("category_hash") != self.categories.hash:
            raise input_error(
                path,
                f"field 'category_hash' {man.get('category_hash')!r} does not match 'categories' "
                f"({self.categories.hash})",
            )
        k = self.categories.num_classes
        if man.get("num_classes") != k or man.get("background_index") != k:
            raise input_error(
                path,
                f"fields 'num_classes'={man.get('num_classes')!r} / "
                f"'background_index'={man.get('background_index')!r} "
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
        identity = man.get("identity")  # absent in dumps of earlier pcbkit versions: nothing to check
        self.identity: dict[str, Any] | None = dict(identity) if isinstance(identity, Mapping) else None
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
        if not SHARD_RE.match(name) or not shard_dir.is_dir():
            raise input_error(shard_dir, "shard listed in the manifest is missing")
        offsets: dict[str, int] = {}
        for col, spec in {**self.specs, IMAGES_SPEC.name: IMAGES_SPEC}.items():
            n = images if col == IMAGES_SPEC.name else rows
            rec = columns.get(col)
            if rec is None:
                raise input_error(shard_dir, f"column {col!r} missing from the manifest entry")
            if rec.get("file") != spec.file:
                raise input_error(
                    shard_dir, f"column {col!r}: file {rec.get('file')!r}, expected {spec.file!r}"
                )
            fpath = shard_dir / spec.file
            if not fpath.is_file():
                raise input_error(fpath, f"shard {name}: column file missing")
            size = fpath.stat().st_size
            if size != int(rec.get("bytes", -1)):
                raise input_error(
                    fpath,
                    f"shard {name} is truncated or altered: {size} bytes, "
                    f"manifest records {rec.get('bytes')}",
                )
            shape, dtype, offset = read_npy_header(fpath)
            if shape != (n, *spec.tail) or dtype != np.dtype(spec.dtype):
                raise input_error(
                    fpath,
                    f"shard {name}: header says {dtype.str} {list(shape)}, "
                    f"expected {spec.dtype} {[n, *spec.tail]}",
                )
            if size != offset + n * spec.row_bytes:
                raise input_error(fpath, f"shard {name} is truncated: {size} bytes for {n} rows")
            offsets[col] = offset
        if self.identity is not None:
            for found, where in (
                (entry.get("identity"), "its manifest entry"),
                (load_json_object(shard_dir / COMPLETE_NAME, "completion record").get("identity"),
                 COMPLETE_NAME),
            ):
                foreign = identity_difference(found, self.identity)
                if foreign is not None:
                    raise input_error(
                        shard_dir, f"shard {name} does not belong to this dump ({where}: {foreign})"
                    )
        return ShardInfo(name=name, rows=rows, images=images, columns=columns, offsets=offsets)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def chunk_rows(self, rows: int) -> int:
        """The rows a chunk of at most `rows` can really hold here (chunks never span two shards)."""
        return max(1, min(int(rows), max((s.rows for s in self.shards), default=1)))

    def check_chunk_memory(
        self, rows: int, columns: Iterable[str], work_bytes_per_row: int = 0, buffers: int = 4,
        available: int | None = None, option: str = "--chunk-rows",
    ) -> int:
        """Refuse (PcbkitError, before anything is allocated) a chunk size whose buffers would need
        more than half the available memory; returns the effective chunk rows.

        Memory: `buffers` chunks of `columns` (iter_chunks' prefetch + 2) plus `work_bytes_per_row`
        of the caller's own work per row. `available`: bytes (default: MemAvailable of the system)."""
        n = self.chunk_rows(rows)
        per_row = sum(self.specs[c].row_bytes for c in columns) * buffers + work_bytes_per_row
        need = n * per_row
        avail = available if available is not None else available_memory()
        if avail is not None and need > avail // 2:
            fit = max(1, avail // 2 // max(per_row, 1))
            raise PcbkitError(
                f"{option} {rows:,}: chunks of {n:,} rows would need about {need / 2**30:.1f} GiB, more than "
                f"half of the {avail / 2**30:.1f} GiB of memory available; use {option} {fit:,} or less"
            )
        return n

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
        rows = self.chunk_rows(rows)  # a chunk never spans two shards: no buffer beyond the largest
        names = list(self.specs) if columns is None else list(columns)
        unknown = [c for c in names if c not in self.specs]
        if unknown:
            raise PcbkitError(
                f"{self.dump_dir}: unknown column(s) {unknown}; this dump has {list(self.specs)}"
            )

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
                    path = self.dump_dir / shard.name / shard.columns[c]["file"]
                    f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in the finally below
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
                    f"shard {shard}: logits contain NaN/inf ({len(bad)} row(s) in this chunk; "
                    f"first at row {row}"
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
        bar_args = {"unit": "row", "unit_scale": True, "disable": not progress, "desc": "verify"}
        with tqdm(total=self.num_rows, **bar_args) as bar:
            for chunk in self.iter_chunks(reuse_buffers=True):
                bar.update(len(chunk["labels"]))


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable; None where it is unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def _read_exact(f: Any, view: memoryview, path: Path) -> None:
    got = 0
    total = len(view)
    while got < total:
        n = f.readinto(view[got:])
        if not n:
            raise input_error(
                path, f"unexpected end of file ({got} of {total} bytes of a chunk): shard truncated"
            )
        got += n
