"""Image folds of a split and their out-of-fold class statistics (cross-fitting, docs/statistics.md §5).

An image's fold is a seeded hash of its id, `image_fold(id, F, seed)` in 1..F: the first 8 bytes of
sha256("pcbkit-fold:<seed>:<id>") as a big-endian integer, mod F, plus 1 — the same on every machine
and Python (never `hash()`). The statistics of fold i are those of every image NOT in fold i, so a
val image of fold i can be calibrated with statistics that never saw it (for F = 2: the other half).
`fold_statistics` reads the dump ONCE, accumulates the in-fold sums S, n, H of each fold (they are
additive, `pcb_analysis.class_sums`) and sums the other folds' for each i; with `gt`, ground-truth
instances are counted on the out-of-fold images (the row prior needs them). Each result records
`extra["fold"]` = {"fold": i, "folds": F, "seed", "images": out-of-fold images, "held_out_images",
"contents"}; `fold_path` names its file `<stem>.fold<i>of<F>.npz` beside the full statistics file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pcb_analysis.dumps import DEFAULT_CHUNK_ROWS, MANIFEST_NAME, DumpReader
from pcb_analysis.errors import ApiMisuseError, PcbkitError, input_error
from pcb_analysis.regime import instance_counts
from pcb_analysis.stats import ClassStats

FOLD_KEY = "fold"  # ClassStats.extra[FOLD_KEY]: the fold a statistics file leaves out
_FOLD_NAME = re.compile(r"^(?P<stem>.+)\.fold(?P<i>[0-9]+)of(?P<f>[0-9]+)\.npz$")


def image_fold(image_id: int, folds: int, seed: int = 0) -> int:
    """The fold (1..`folds`) of one image: sha256 of "pcbkit-fold:<seed>:<id>", first 8 bytes, mod F, + 1."""
    check_folds(folds, seed)
    digest = hashlib.sha256(f"pcbkit-fold:{int(seed)}:{int(image_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % int(folds) + 1


def image_folds(image_ids: Iterable[int], folds: int, seed: int = 0) -> dict[int, int]:
    """{image id: fold} for many images (each id hashed once)."""
    return {int(i): image_fold(int(i), folds, seed) for i in dict.fromkeys(int(x) for x in image_ids)}


def check_folds(folds: int, seed: int) -> None:
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise PcbkitError(f"--split-folds must be an integer >= 2 (got {folds!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PcbkitError(f"--fold-seed must be an integer >= 0 (got {seed!r})")


def fold_path(stats_path: str | Path, fold: int, folds: int) -> Path:
    """`<dir>/<stem>.fold<i>of<F>.npz`: the statistics of every image except fold i, beside `stats_path`."""
    p = Path(stats_path)
    if not 1 <= fold <= folds:
        raise ApiMisuseError(f"fold_path: fold must be in 1..{folds}, got {fold}")
    return p.with_name(f"{p.stem}.fold{fold}of{folds}.npz")


def find_fold_files(stats_path: str | Path) -> list[Path]:
    """The complete fold set `<stem>.fold<i>of<F>.npz` (i = 1..F) beside `stats_path`, in fold order.

    One-line errors when there is none, when a fold is missing, or when several F are present."""
    p = Path(stats_path)
    sets: dict[int, set[int]] = {}
    for f in p.parent.glob(f"{glob_escape(p.stem)}.fold*of*.npz"):
        m = _FOLD_NAME.match(f.name)
        if m and m["stem"] == p.stem:
            sets.setdefault(int(m["f"]), set()).add(int(m["i"]))
    if not sets:
        raise input_error(p, f"no fold statistics beside it ({p.stem}.fold<i>of<F>.npz); write them with "
                             "`pcbkit stats --split-folds F`")
    if len(sets) > 1:
        raise input_error(p, f"several fold sets beside it (F = {', '.join(map(str, sorted(sets)))}); "
                             "remove all but one")
    (folds, have), = sets.items()
    missing = sorted(set(range(1, folds + 1)) - have)
    if missing:
        first = fold_path(p, missing[0], folds).name
        raise input_error(p, f"fold set of F={folds} is incomplete: missing {first}")
    return [fold_path(p, i, folds) for i in range(1, folds + 1)]


def glob_escape(text: str) -> str:
    """`text` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def in_fold_statistics(
    reader: DumpReader, folds: int, seed: int = 0, *, progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS, split: str | None = None,
) -> tuple[list[ClassStats], list[np.ndarray]]:
    """One pass over the dump: per fold (1..F, list index i-1) the sums over ITS images, and its image ids."""
    check_folds(folds, seed)
    if reader.num_rows == 0:
        raise input_error(reader.dump_dir / MANIFEST_NAME, "dump holds no proposal rows")
    parts = [ClassStats.zeros(reader.num_classes, categories=reader.categories, source=str(reader.dump_dir),
                              split=split if split is not None else reader.split) for _ in range(folds)]
    fold_of: dict[int, int] = {}
    bar_args = {"unit": "row", "unit_scale": True, "disable": not progress, "desc": f"stats, {folds} folds"}
    with tqdm(total=reader.num_rows, mininterval=0.5, **bar_args) as bar:
        for chunk in reader.iter_chunks(chunk_rows, columns=("image_ids", "logits", "labels")):
            ids = chunk["image_ids"]
            for i in np.unique(ids).tolist():
                if i not in fold_of:
                    fold_of[i] = image_fold(i, folds, seed)
            per_row = np.vectorize(fold_of.__getitem__, otypes=[np.int64])(ids) if len(ids) else ids
            logits, labels = torch.from_numpy(chunk["logits"]), torch.from_numpy(chunk["labels"])
            for f in range(1, folds + 1):
                rows = torch.from_numpy(np.flatnonzero(per_row == f))
                if len(rows):
                    parts[f - 1].update(logits[rows], labels[rows], check_finite_logits=False,
                                        source=f"{reader.dump_dir / chunk.shard}")
            bar.update(len(labels))
    images = [np.array(sorted(i for i, f in fold_of.items() if f == k), dtype=np.int64)
              for k in range(1, folds + 1)]
    return parts, images


def out_of_fold(parts: Sequence[ClassStats], fold: int) -> ClassStats:
    """The sums of every part except `fold` (1-based): S, n, H and the row counts add."""
    others = [p for i, p in enumerate(parts, start=1) if i != fold]
    if not others or not 1 <= fold <= len(parts):
        raise ApiMisuseError(f"out_of_fold: fold {fold} of {len(parts)} parts leaves nothing")
    total = others[0]
    for p in others[1:]:
        total = ClassStats.merge(total, p)
    if len(others) == 1:  # merge copies; a single part must not be shared with the caller's list
        total = ClassStats.merge(total, ClassStats.zeros(total.num_classes, total.categories))
    total.source = others[0].source
    total.split = others[0].split
    return total


def fold_statistics(
    dump: str | Path | DumpReader, folds: int, seed: int = 0, *, gt: str | Path | None = None,
    progress: bool = True, chunk_rows: int = DEFAULT_CHUNK_ROWS, split: str | None = None,
) -> list[ClassStats]:
    """The out-of-fold statistics of folds 1..F from ONE pass over the dump (list index i-1: every image
    except fold i), each with `extra["fold"]`; with `gt` (the split's LVIS file), the instances per
    class on its images (`pcb_analysis.regime.instance_counts`)."""
    reader = dump if isinstance(dump, DumpReader) else DumpReader(dump)
    parts, images = in_fold_statistics(reader, folds, seed, progress=progress, chunk_rows=chunk_rows,
                                       split=split)
    out: list[ClassStats] = []
    for i in range(1, folds + 1):
        st = out_of_fold(parts, i)
        kept = np.concatenate([ids for f, ids in enumerate(images, start=1) if f != i])
        info: dict[str, Any] = {"fold": i, "folds": folds, "seed": seed, "images": int(kept.size),
                                "held_out_images": int(images[i - 1].size),
                                "contents": f"every image of the dump except fold {i} of {folds}"}
        st.extra[FOLD_KEY] = info
        if gt is not None:
            assert st.categories is not None  # a dump always carries its category space
            st.instances, counted = instance_counts(gt, st.categories, kept)
            st.extra["instances"] = {"gt": str(gt), "images": counted}
        out.append(st)
    return out


def write_fold_statistics(stats_path: str | Path, fold_stats: Sequence[ClassStats]) -> list[Path]:
    """Save each out-of-fold statistics under `fold_path(stats_path, i, F)` (atomically); the paths."""
    folds = len(fold_stats)
    return [st.save(fold_path(stats_path, i, folds)) for i, st in enumerate(fold_stats, start=1)]


def fold_info(stats: ClassStats, path: str | Path) -> dict[str, Any]:
    """The `extra["fold"]` record of a fold statistics file, checked."""
    info = stats.extra.get(FOLD_KEY)
    if not isinstance(info, dict) or not {"fold", "folds", "seed"} <= set(info):
        raise input_error(path, "field 'meta.extra.fold' is missing: not a fold statistics file")
    return info
