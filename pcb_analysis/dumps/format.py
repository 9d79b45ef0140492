"""The on-disk format of a logit dump: names, column specs, the fixed .npy header (docs/dumps.md §1-§2).

R proposals, K foreground classes. Per-row columns (one `<name>.npy` per shard):
image_ids [R] <i8, boxes [R, 4] <f4 (xyxy), logits [R, K+1] <f2 (background last),
labels [R] <i4 (-1 ignore, 0..K-1 positive, K background), ious [R] <f4, and optionally
regressed [R, 4] or [R, K*4] <f4. Every shard also stores images [I] <i8 (all its image ids).
Directory layout: docs/dumps.md §2. This module knows nothing of writing order, manifests' merge
or statistics; the writer, the manifest merge and the reader build on it. It also says what a
complete shard is (`complete_record`, `damaged_column`) and whose it is (`dump_identity`).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcb_analysis.errors import PcbkitError, input_error

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
# mixing rows of two checkpoints, ground truths or configs would silently corrupt every statistic.
MUST_MATCH_PROVENANCE = ("checkpoint_hash", "gt_hash", "config")
IDENTITY_KEYS = ("checkpoint_hash", "gt_hash", "config_hash")

SHARD_RE = re.compile(r"^shard-r(\d{2,})-(\d{5,})$")
RANK_MANIFEST_RE = re.compile(r"^manifest-r(\d{2,})\.json$")


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


def dump_identity(provenance: Mapping[str, Any]) -> dict[str, str | None]:
    """The identity of the run that writes a dump: {checkpoint_hash, gt_hash, config_hash} (None for
    what the provenance lacks). Every shard carries it; a shard of another run is refused."""
    config = provenance.get("config")
    config_hash = None
    if config is not None:
        text = json.dumps(config, sort_keys=True, default=str).encode("utf-8")
        config_hash = hashlib.sha256(text).hexdigest()[:16]
    return {
        "checkpoint_hash": provenance.get("checkpoint_hash"),
        "gt_hash": provenance.get("gt_hash"),
        "config_hash": config_hash,
    }


def identity_difference(found: Any, expected: Mapping[str, Any]) -> str | None:
    """None when `found` (a shard's identity) is `expected`; else what differs, for a message."""
    if not isinstance(found, Mapping):
        return "it carries no run identity (written by another run or an earlier pcbkit)"
    keys = [k for k in IDENTITY_KEYS if found.get(k) != expected.get(k)]
    if not keys:
        return None
    return "written by another run (" + ", ".join(
        f"{k} {found.get(k)!r}, expected {expected.get(k)!r}" for k in keys
    ) + ")"


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:02d}-{index:05d}"


def rank_manifest_name(rank: int) -> str:
    return f"manifest-r{rank:02d}.json"


def npy_header(descr: str, shape: Sequence[int]) -> bytes:
    """A .npy v1.0 header of exactly NPY_HEADER_BYTES bytes (np.load reads it like its own)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    body = text.encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise PcbkitError(f"npy header for shape {tuple(shape)} does not fit {NPY_HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
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


def load_json_object(path: Path, what: str) -> dict[str, Any]:
    """A manifest or completion record: a JSON object, or a PcbkitError naming `path` and `what`."""
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


def damaged_column(shard_dir: Path, rec: Mapping[str, Any]) -> str | None:
    """The first column whose data fails the CRC-32 of its completion record (None: all intact)."""
    for name, c in rec["columns"].items():
        crc = 0
        with open(shard_dir / c["file"], "rb") as f:
            f.seek(int(c.get("data_offset", NPY_HEADER_BYTES)))
            while block := f.read(1 << 22):
                crc = zlib.crc32(block, crc)
        if crc != int(c["crc32"]):
            return name
    return None


def complete_record(shard_dir: Path, specs: Mapping[str, ColumnSpec]) -> dict[str, Any] | None:
    """The shard's completion record if it is present, consistent and every file has its recorded size."""
    try:
        rec = load_json_object(shard_dir / COMPLETE_NAME, "completion record")
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
