"""Regime diagnostics: does a split's confusion matrix M describe a detector calibration can help?

`diagnose(stats)` -> `RegimeDiagnostics` (frozen): per r/c/f bucket the mean diagonal of M over the
classes WITH positives (a class without positives has no row and is left out of every mean), the
ground-truth instances per class (min, median), and the fraction of foreground mass `cm`'s clipping
removes; over the whole matrix sigma_min(M), cond_2(M) = sigma_max / sigma_min of the matrix `cm`
inverts (identity rows for empty classes), and the smallest L1 distance between a rare class's row
and any other class's row. `lines()` is what `pcbkit stats` prints, `TABLE_HEADER`/`table_row()`
the study report's table. The per-class sums behind the last two diagnostics are measured once
from the split (`instance_counts` from its LVIS file, `clip_mass_from_dump` in a second pass over
the dump) and stored in the statistics file; `stats_from_dump` does all of it. docs/statistics.md §4.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from pcb_analysis.categories import FREQUENCIES, CategorySpace
from pcb_analysis.class_sums import foreground_probs
from pcb_analysis.dumps import DEFAULT_CHUNK_ROWS, DumpReader
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.lvis_gt import load_ground_truth
from pcb_analysis.stats import ClassStats

__all__ = [
    "DEFAULT_CLIP_ROWS",
    "TABLE_HEADER",
    "BucketDiagnostics",
    "ClipMass",
    "RegimeDiagnostics",
    "clip_mass_from_dump",
    "clip_stride",
    "clipped_mass_sums",
    "diagnose",
    "instance_counts",
    "stats_from_dump",
]

logger = logging.getLogger(__name__)

DEFAULT_CLIP_ROWS = 262_144  # positives the clipped mass reads at most (a float64 [rows, K] x [K, K] product)
TABLE_HEADER = (
    "statistics", "diag r", "diag c", "diag f", "cond_2(M)", "sigma_min",
    "inst. r min/med", "inst. c min/med", "inst. f min/med", "min L1 rare row", "clipped mass",
)


class ClipMass(NamedTuple):
    """Per true class i, over its positives: sum of the negative parts of p M^-1 (`negative`) and of
    |p M^-1| (`total`), both [K] float64 (docs/statistics.md §4)."""

    negative: Tensor
    total: Tensor


@dataclass(frozen=True)
class BucketDiagnostics:
    """One frequency bucket ('r', 'c' or 'f')."""

    bucket: str
    classes: int  # classes in the bucket
    with_rows: int  # of them, classes with at least one positive
    mean_diagonal: float  # mean of M[i, i] over the classes with rows; NaN when there are none
    instances_min: int | None  # ground-truth instances per class (None: not measured)
    instances_median: float | None
    clipped_fraction: float | None  # negative / total over the bucket's positives (None: not measured)


@dataclass(frozen=True)
class RegimeDiagnostics:
    """The regime of one statistics file (docs/statistics.md §4); `label` names it in tables."""

    label: str
    num_classes: int
    positives: int
    classes_with_rows: int
    buckets: tuple[BucketDiagnostics, ...]  # r, c, f (buckets without classes are left out)
    mean_diagonal: float  # over all classes with rows (NaN if none)
    sigma_max: float
    sigma_min: float
    cond2: float  # sigma_max / sigma_min; inf for a singular M
    rare_l1: float | None  # None: no rare class with a row, or no other row
    rare_l1_pair: tuple[str, str] | None  # (rare class, its nearest row's class)
    clipped_fraction: float | None  # over all positives; None: not measured (or M singular)
    instance_images: int | None = None  # images the instance counts cover (None: unknown)
    clip_rows: int | None = None  # positives the clipped mass used, when fewer than all (None: all)

    def bucket(self, name: str) -> BucketDiagnostics | None:
        return next((b for b in self.buckets if b.bucket == name), None)

    def lines(self) -> list[str]:
        """Human-readable lines (what `pcbkit stats` prints)."""
        head = f"regime diagnostics{f' ({self.label})' if self.label else ''} (docs/statistics.md §4):"
        diag = "; ".join(f"{b.bucket} {_num(b.mean_diagonal, '.3f')} ({b.with_rows}/{b.classes})"
                         for b in self.buckets)
        out = [head, f"  mean diagonal of M over classes with positives: {diag}; all "
                     f"{_num(self.mean_diagonal, '.3f')} ({self.classes_with_rows}/{self.num_classes})",
               f"  cond_2(M) {_num(self.cond2, '.3g')}, sigma_min {_num(self.sigma_min, '.3g')}, "
               f"sigma_max {_num(self.sigma_max, '.3g')} (the matrix cm inverts)"]
        if not self.buckets or self.buckets[0].instances_min is None:
            out.append("  ground-truth instances per class: not measured (pass the split's LVIS file: --gt)")
        else:
            inst = "; ".join(f"{b.bucket} min {b.instances_min} median {_num(b.instances_median, 'g')}"
                             for b in self.buckets)
            where = "" if self.instance_images is None else f" ({self.instance_images:,} images)"
            out.append(f"  ground-truth instances per class{where}: {inst}")
        if self.rare_l1 is None:
            out.append("  smallest L1 distance rare row -> any other row: - (no rare row, or no other row)")
        else:
            pair = self.rare_l1_pair or ("?", "?")
            out.append(f"  smallest L1 distance rare row -> any other row: {self.rare_l1:.3f} "
                       f"({pair[0]} -> {pair[1]})")
        if self.clipped_fraction is None:
            out.append("  foreground mass removed by cm's clipping: not measured")
        else:
            per = ", ".join(f"{b.bucket} {_num(b.clipped_fraction, '.3f')}" for b in self.buckets)
            used = (f"{self.positives:,} positives" if self.clip_rows is None
                    else f"{self.clip_rows:,} of {self.positives:,} positives")
            out.append(f"  foreground mass removed by cm's clipping: {self.clipped_fraction:.3f} of |p M^-1| "
                       f"over {used} (by true class: {per})")
        return out

    def table_row(self) -> list[str]:
        """One row under `TABLE_HEADER`."""
        by = {b.bucket: b for b in self.buckets}

        def diag(f: str) -> str:
            return _num(by[f].mean_diagonal, ".2f") if f in by else "-"

        def inst(f: str) -> str:
            b = by.get(f)
            if b is None or b.instances_min is None:
                return "-"
            return f"{b.instances_min} / {_num(b.instances_median, 'g')}"

        return [
            self.label, diag("r"), diag("c"), diag("f"), _num(self.cond2, ".3g"), _num(self.sigma_min, ".3g"),
            inst("r"), inst("c"), inst("f"), "-" if self.rare_l1 is None else f"{self.rare_l1:.3f}",
            "-" if self.clipped_fraction is None else f"{self.clipped_fraction:.3f}",
        ]


def _num(x: float | None, fmt: str) -> str:
    if x is None or math.isnan(x):
        return "-"
    return "inf" if math.isinf(x) else format(x, fmt)


# ------------------------------------------------------------------------------ the diagnostics


def diagnose(
    stats: ClassStats,
    instances: Tensor | np.ndarray | None = None,
    clip: ClipMass | None = None,
    label: str = "",
) -> RegimeDiagnostics:
    """The regime diagnostics of `stats` (needs its category space for the r/c/f buckets).

    `instances` [K] (ground-truth annotations per class) and `clip` default to the sums stored in
    `stats` (`stats.instances`, `stats.clip_negative` / `stats.clip_total`, with the image count and
    the rows used from `stats.extra`); without them those diagnostics read "not measured".
    """
    space = stats.categories
    if space is None:
        raise PcbkitError(f"{stats.source or 'statistics'}: no category space, so no r/c/f buckets")
    k = stats.num_classes
    m = stats.confusion(warn=False).to(torch.float64).cpu()
    has_row = ~stats.empty_classes().cpu().numpy()
    diag = torch.diagonal(m).numpy()
    freq = np.asarray(space.frequency)
    inst_stored = instances is None and stats.instances is not None
    if inst_stored:
        instances = stats.instances
    inst = None if instances is None else np.asarray(torch.as_tensor(instances).cpu(), dtype=np.int64)
    if inst is not None and inst.shape != (k,):
        raise PcbkitError(f"diagnose: instances must be [K] = [{k}], got {list(inst.shape)}")
    clip_stored = clip is None and stats.clip_negative is not None and stats.clip_total is not None
    if clip_stored:
        clip = ClipMass(stats.clip_negative, stats.clip_total)
    sums: tuple[np.ndarray, np.ndarray] | None = None
    if clip is not None:
        sums = (clip.negative.cpu().numpy().astype(np.float64), clip.total.cpu().numpy().astype(np.float64))
        if sums[0].shape != (k,) or sums[1].shape != (k,):
            raise PcbkitError(f"diagnose: clip sums must be [K] = [{k}], got "
                              f"{list(sums[0].shape)}, {list(sums[1].shape)}")
    buckets = []
    for f in FREQUENCIES:
        in_b = freq == f
        if not in_b.any():
            continue
        rows = in_b & has_row
        buckets.append(BucketDiagnostics(
            bucket=f,
            classes=int(in_b.sum()),
            with_rows=int(rows.sum()),
            mean_diagonal=float(diag[rows].mean()) if rows.any() else math.nan,
            instances_min=None if inst is None else int(inst[in_b].min()),
            instances_median=None if inst is None else float(np.median(inst[in_b])),
            clipped_fraction=None if sums is None else _fraction(sums[0][in_b], sums[1][in_b]),
        ))
    sv = torch.linalg.svdvals(m)
    s_max, s_min = float(sv.max()), float(sv.min())
    l1, pair = min_rare_l1(m, has_row, freq)
    return RegimeDiagnostics(
        label=label,
        num_classes=k,
        positives=int(stats.n.sum()),
        classes_with_rows=int(has_row.sum()),
        buckets=tuple(buckets),
        mean_diagonal=float(diag[has_row].mean()) if has_row.any() else math.nan,
        sigma_max=s_max,
        sigma_min=s_min,
        cond2=s_max / s_min if s_min > 0 else math.inf,
        rare_l1=l1,
        rare_l1_pair=None if pair is None else (space.names[pair[0]], space.names[pair[1]]),
        clipped_fraction=None if sums is None else _fraction(*sums),
        instance_images=_instance_images(stats) if inst_stored else None,
        clip_rows=_clip_rows(stats) if clip_stored else None,
    )


def _instance_images(stats: ClassStats) -> int | None:
    rec = stats.extra.get("instances")
    return int(rec["images"]) if isinstance(rec, dict) and "images" in rec else None


def _clip_rows(stats: ClassStats) -> int | None:
    rec = stats.extra.get("clip_mass")
    if isinstance(rec, dict) and int(rec.get("stride", 1)) > 1:
        return int(rec["rows"])
    return None


def _fraction(neg: np.ndarray, tot: np.ndarray) -> float | None:
    total = float(tot.sum())
    return float(neg.sum()) / total if total > 0 else None


def min_rare_l1(
    m: Tensor, has_row: np.ndarray, freq: np.ndarray
) -> tuple[float | None, tuple[int, int] | None]:
    """Smallest sum_j |M[r, j] - M[o, j]| over rare classes r and other classes o, both with rows.

    Returns (distance, (r, o)), or (None, None) when no rare class has a row or no other row exists.
    """
    rows = np.flatnonzero(has_row)
    rare = np.flatnonzero(has_row & (freq == "r"))
    if rare.size == 0 or rows.size < 2:
        return None, None
    d = torch.cdist(m[torch.from_numpy(rare)], m[torch.from_numpy(rows)], p=1.0)  # [R, N] float64
    d[torch.from_numpy(rare)[:, None] == torch.from_numpy(rows)[None, :]] = math.inf  # not itself
    flat = int(torch.argmin(d))
    i, j = divmod(flat, rows.size)
    return float(d[i, j]), (int(rare[i]), int(rows[j]))


# ------------------------------------------------------------------------------ the measured sums


def clipped_mass_sums(p: Tensor, labels: Tensor, m_inv: Tensor) -> ClipMass:
    """For positives p [R, K] of true classes `labels` [R] (0..K-1): per true class, the sums of the
    negative parts of v = p M^-1 and of |v|, in float64 (operand `m_inv` = M^-1 [K, K])."""
    k = m_inv.shape[0]
    if p.dim() != 2 or p.shape[1] != k or labels.shape != (p.shape[0],):
        raise PcbkitError(f"clipped_mass_sums: p must be [R, K={k}] with labels [R]; got "
                          f"{list(p.shape)}, {list(labels.shape)}")
    if p.shape[0] and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise PcbkitError(f"clipped_mass_sums: labels must be in 0..{k - 1} (positives only)")
    v = p.to(torch.float64) @ m_inv.to(torch.float64)
    idx = labels.to(torch.int64)
    neg = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, (-v).clamp_(min=0.0).sum(dim=1))
    tot = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, v.abs().sum(dim=1))
    return ClipMass(neg, tot)


def clip_stride(positives: int, max_rows: int | None) -> int:
    """Every how many positives the clipped mass reads so that at most `max_rows` are used (None: all)."""
    if max_rows is not None and max_rows < 1:
        raise PcbkitError(f"clip rows must be >= 1 (or None for all), got {max_rows}")
    return 1 if max_rows is None or positives <= max_rows else -(-positives // max_rows)


def clip_mass_from_dump(
    reader: DumpReader,
    stats: ClassStats,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    stride: int = 1,
) -> ClipMass | None:
    """Second pass over the dump's positives with `stats`' own M (no ridge); None if M is singular.

    With `stride` s > 1 only every s-th positive (in dump order: positives 0, s, 2s, ...) is used."""
    m = stats.confusion(warn=False).to(torch.float64)
    try:
        m_inv = torch.linalg.inv(m)
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        m_inv = None
    if m_inv is None or not bool(torch.isfinite(m_inv).all()):
        logger.warning("%s: the confusion matrix is singular; the clipped mass is not measured",
                       reader.dump_dir)
        return None
    k = stats.num_classes
    neg = torch.zeros(k, dtype=torch.float64)
    tot = torch.zeros(k, dtype=torch.float64)
    seen = 0  # positives before this chunk
    bar_args = {"unit": "row", "unit_scale": True, "disable": not progress, "desc": "clipped mass"}
    with tqdm(total=reader.num_rows, mininterval=0.5, **bar_args) as bar:
        for chunk in reader.iter_chunks(chunk_rows, columns=("logits", "labels"), reuse_buffers=True):
            labels = torch.from_numpy(chunk["labels"]).to(torch.int64)
            pos = torch.nonzero((labels >= 0) & (labels < k)).flatten()
            keep = pos[(seen + torch.arange(len(pos))) % stride == 0] if stride > 1 else pos
            seen += len(pos)
            if len(keep):
                p = foreground_probs(torch.from_numpy(chunk["logits"])[keep], k)
                part = clipped_mass_sums(p, labels[keep], m_inv)
                neg += part.negative
                tot += part.total
            bar.update(len(labels))
    return ClipMass(neg, tot)


def instance_counts(
    gt: str | Path, categories: CategorySpace, image_ids: np.ndarray | None = None
) -> tuple[Tensor, int]:
    """Ground-truth instances per class [K] int64 in an LVIS file, and the number of images counted.

    Counts the annotations lvis-api evaluates (0 < area, not `ignore`), on `image_ids` only when
    given (e.g. the images a dump covers; every one must be in the file). The file's categories
    must be `categories` (same ids and r/c/f).
    """
    g = load_ground_truth(gt)
    ids, fr = tuple(int(c) for c in g.cat_ids), tuple(str(f) for f in g.cat_freq)
    if ids != categories.ids or fr != categories.frequency:
        raise input_error(gt, f"field 'categories': {len(ids)} categories that differ from the statistics' "
                              f"category space (K={categories.num_classes}, hash {categories.hash})")
    keep = ~g.ann_ignore
    n_images = int(g.img_ids.shape[0])
    if image_ids is not None:
        wanted = np.unique(np.asarray(image_ids, dtype=np.int64))
        missing = np.setdiff1d(wanted, g.img_ids)
        if missing.size:
            raise input_error(gt, f"field 'images': {missing.size} image(s) of the statistics are not in it "
                                  f"(first: {missing[:5].tolist()}); is it the right split?")
        keep &= np.isin(g.img_ids[g.ann_img], wanted)
        n_images = int(wanted.size)
    counts = np.bincount(g.ann_cat[keep], minlength=categories.num_classes).astype(np.int64)
    return torch.from_numpy(counts), n_images


def stats_from_dump(
    dump_dir: str | Path | DumpReader,
    gt: str | Path | None = None,
    clip_mass: bool = True,
    clip_rows: int | None = DEFAULT_CLIP_ROWS,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    split: str | None = None,
) -> ClassStats:
    """`ClassStats.from_dump` plus the diagnostics' sums: instance counts from `gt` (the split's LVIS
    file, restricted to the dump's images) and, with `clip_mass`, a second pass for `ClipMass` over
    at most `clip_rows` positives (every s-th; None: all of them)."""
    reader = dump_dir if isinstance(dump_dir, DumpReader) else DumpReader(dump_dir)
    st = ClassStats.from_dump(reader, progress=progress, chunk_rows=chunk_rows, split=split)
    if gt is not None:
        assert st.categories is not None  # a dump always carries its category space
        st.instances, images = instance_counts(gt, st.categories, reader.image_ids())
        st.extra["instances"] = {"gt": str(gt), "images": images}
    if clip_mass and int(st.n.sum()) > 0:
        positives = int(st.n.sum())
        stride = clip_stride(positives, clip_rows)
        clip = clip_mass_from_dump(reader, st, progress=progress, chunk_rows=chunk_rows, stride=stride)
        if clip is not None:
            st.clip_negative, st.clip_total = clip
            st.extra["clip_mass"] = {"matrix": "confusion (identity rows for empty classes), ridge 0",
                                     "stride": stride, "rows": -(-positives // stride)}
    return st
