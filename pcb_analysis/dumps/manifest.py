"""Manifests of a dump: the shard list readers trust, per-rank manifests and their merge (docs/dumps.md §3).

A manifest is a JSON object: the dump's header (format, schema_version, category space and its
hash, num_classes = background_index = K, split, regressed kind, column dtypes, world_size,
provenance), then `shards` (name, rank, rows, images, per-column records: file, dtype, shape,
bytes, data_offset, crc32), `num_rows`, `num_images` and `finished`. Each writer rank keeps
`manifest-rNN.json`; `merge_manifests` combines them into `manifest.json`, refusing ranks that
disagree on the header or on the `MUST_MATCH_PROVENANCE` keys, and images dumped twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.dumps.format import (
    IMAGES_SPEC,
    MANIFEST_NAME,
    MUST_MATCH_PROVENANCE,
    RANK_MANIFEST_RE,
    load_json_object,
    rank_manifest_name,
)
from pcb_analysis.errors import input_error

logger = logging.getLogger(__name__)

# Header fields two rank manifests must share to be merged.
_MERGE_KEYS = (
    "format", "schema_version", "category_hash", "num_classes", "split", "regressed", "columns", "identity"
)
_SHOWN_CHARS = 60  # a differing value longer than this is shortened in messages


def shard_entry(name: str, rank: int, rec: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of one complete shard, from its completion record `rec`."""
    entry = {
        "name": name,
        "rank": rank,
        "rows": int(rec["rows"]),
        "images": int(rec["images"]),
        "columns": rec["columns"],
    }
    if "identity" in rec:
        entry["identity"] = rec["identity"]
    return entry


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def value_differences(old: Any, new: Any, limit: int = 4) -> str:
    """The dotted keys where two (nested) values differ, with both short values:
    'dump.positives_only: False -> True' (the first `limit`, then how many more)."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    shown = [
        f"{k or 'value'}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}"
        for k in keys[:limit]
    ]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


def check_provenance(old: Mapping[str, Any], new: Mapping[str, Any], path: Path, what: str) -> None:
    """Refuse a differing `MUST_MATCH_PROVENANCE` key; warn about any other differing key."""
    for key in MUST_MATCH_PROVENANCE:
        if key in old and key in new and old[key] != new[key]:
            raise input_error(
                path,
                f"provenance {key!r} differs from the {what} ({value_differences(old[key], new[key])}; "
                f"the {what}'s value first)",
            )
    differing = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    if differing:
        logger.warning("%s: provenance field(s) %s differ from the %s", path, differing, what)


def merged_manifest(
    header: Mapping[str, Any], shards: list[dict[str, Any]], world_size: int, finished: bool
) -> dict[str, Any]:
    """The merged manifest: a rank manifest's header, all ranks' shards, totals and the finished flag."""
    per_rank = ("rank", "finished", "shards", "num_rows", "num_images")
    manifest = {k: v for k, v in header.items() if k not in per_rank}
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
        m = RANK_MANIFEST_RE.match(entry.name)
        if m:
            found[int(m.group(1))] = load_json_object(entry, "rank manifest")
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
                raise input_error(
                    path, "rank did not finish (field 'finished' is false): rerun the dump to resume it"
                )
            finished = False
        for key in _MERGE_KEYS:
            if man.get(key) != first.get(key):
                raise input_error(
                    path, f"field {key!r} is {man.get(key)!r}, rank {min(found)} has {first.get(key)!r}"
                )
        check_provenance(first.get("provenance", {}), man.get("provenance", {}), path, f"rank {min(found)}")
        shards.extend(man.get("shards", []))
    shards.sort(key=lambda s: s["name"])
    _refuse_duplicate_images(dump_dir, shards)
    manifest = merged_manifest(first, shards, w, finished)
    write_json_atomic(dump_dir / MANIFEST_NAME, manifest, indent=1)
    return manifest


def _refuse_duplicate_images(dump_dir: Path, shards: list[dict[str, Any]]) -> None:
    """Raise when an image id is in two shards: every statistic would count it twice."""
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
