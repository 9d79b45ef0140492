"""`ClassStats`: the offline class statistics of a split (docs/method.md §2).

S [K, K] float64, n [K] int64, H [K, K] int64 on the CPU, accumulated batch by batch with
`pcb_analysis.class_sums.batch_sums` (sums are additive: merging shards == one pass), plus
provenance (category space, source, split, row counts). Derived: confusion M [K, K] = S / n
row-wise (empty classes -> identity rows), mean score s = diag(M), hard confusion H / n.
`ClassStats.from_dump` streams a logit dump (`pcb_analysis.dumps`); `save`/`load` write and
validate an `.npz` (S, n, H, CM, MS, empty, meta JSON; optionally the regime-diagnostic sums
`instances`, `clip_negative`, `clip_total` of `pcb_analysis.regime`, which merging drops). The
batch math it shares with the trainer lives in `pcb_analysis.class_sums`, re-exported here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from pcb_analysis.atomic import write_with_atomic
from pcb_analysis.categories import CategorySpace
from pcb_analysis.class_sums import (
    DEFAULT_CHUNK_ROWS,
    IGNORE_LABEL,
    BatchSums,
    batch_sums,
    check_finite,
    check_logits_labels,
    ema_update_,
    foreground_probs,
    row_normalise,
)
from pcb_analysis.dumps import DEFAULT_CHUNK_ROWS as DUMP_CHUNK_ROWS
from pcb_analysis.dumps import MANIFEST_NAME, DumpReader
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.stats_file import meta_count, read_meta, read_npz

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FILE_KIND",
    "IGNORE_LABEL",
    "SCHEMA_VERSION",
    "BatchSums",
    "ClassStats",
    "batch_sums",
    "check_finite",
    "check_logits_labels",
    "ema_update_",
    "foreground_probs",
    "row_normalise",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE_KIND = "pcbkit.class_stats"
_ARRAYS = ("S", "n", "H", "CM", "MS", "empty")
_OPTIONAL_ARRAYS = {"instances": np.int64, "clip_negative": np.float64, "clip_total": np.float64}


@dataclass
class ClassStats:
    """Offline class statistics over a split: S [K, K] float64, n [K] int64, H [K, K] int64 (CPU).

    Provenance travels with the sums: `categories` (optional `CategorySpace`), `source` (what was
    read, e.g. a dump directory), `split` (e.g. "val"), and row counts (`rows`, `background`,
    `ignored` seen by `update`). Optional regime-diagnostic sums (docs/statistics.md §4), each [K]:
    `instances` (int64, ground-truth annotations per class on the images read), `clip_negative` and
    `clip_total` (float64, per true class: the negative parts and the absolute mass of p M^-1 over
    the positives, with M this object's own confusion matrix). `merge` drops them (M changes).
    """

    S: Tensor
    n: Tensor
    H: Tensor
    categories: CategorySpace | None = None
    source: str = ""
    split: str | None = None
    rows: int = 0
    background: int = 0
    ignored: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    instances: Tensor | None = None
    clip_negative: Tensor | None = None
    clip_total: Tensor | None = None

    def __post_init__(self) -> None:
        k = self.S.shape[0]
        if self.S.shape != (k, k) or self.n.shape != (k,) or self.H.shape != (k, k):
            raise PcbkitError(
                f"ClassStats: S must be [K, K], n [K], H [K, K]; got {list(self.S.shape)}, "
                f"{list(self.n.shape)}, {list(self.H.shape)}"
            )
        for name in _OPTIONAL_ARRAYS:
            arr = getattr(self, name)
            if arr is not None and tuple(arr.shape) != (k,):
                raise PcbkitError(f"ClassStats: {name} must be [K] = [{k}], got {list(arr.shape)}")
        if self.categories is not None and self.categories.num_classes != k:
            raise PcbkitError(
                f"ClassStats: category space has {self.categories.num_classes} classes, statistics K={k}"
            )

    # -------------------------------------------------------------------- construction
    @classmethod
    def zeros(
        cls,
        num_classes: int,
        categories: CategorySpace | None = None,
        source: str = "",
        split: str | None = None,
    ) -> ClassStats:
        """Empty statistics for K = `num_classes`."""
        k = int(num_classes)
        if k < 1:
            raise PcbkitError(f"ClassStats.zeros: K must be >= 1, got {num_classes}")
        return cls(
            S=torch.zeros(k, k, dtype=torch.float64),
            n=torch.zeros(k, dtype=torch.int64),
            H=torch.zeros(k, k, dtype=torch.int64),
            categories=categories,
            source=source,
            split=split,
        )

    @classmethod
    def from_dump(
        cls,
        dump_dir: str | Path | DumpReader,
        expected_categories: CategorySpace | None = None,
        progress: bool = True,
        chunk_rows: int = DUMP_CHUNK_ROWS,
        split: str | None = None,
    ) -> ClassStats:
        """Stream a logit dump through `update` (S, n, H over the positive proposals, docs/method.md §2).

        `dump_dir` may be an open `DumpReader` (e.g. one opened with `allow_unfinished=True`).
        Reads only the `labels` and `logits` columns, chunk by chunk into reused buffers (peak memory
        a few chunks, independent of the dump size), with a tqdm bar (rows/s, ETA). The reader has
        already checked CRC-32, the label range and finiteness of every row (background and ignored
        rows too), so `update` skips its own full finiteness scan. The result carries `categories`,
        `source` (the dump directory), `split` (the manifest's unless `split` is given) and the row
        counts (`rows`, `background`, `ignored`).
        """
        if isinstance(dump_dir, DumpReader):
            reader = dump_dir
            if expected_categories is not None:
                expected_categories.check_same(reader.categories, str(reader.dump_dir / MANIFEST_NAME))
        else:
            reader = DumpReader(dump_dir, expected_categories=expected_categories)
        if reader.num_rows == 0:
            raise input_error(reader.dump_dir / MANIFEST_NAME, "dump holds no proposal rows")
        st = cls.zeros(
            reader.num_classes,
            categories=reader.categories,
            source=str(reader.dump_dir),
            split=split if split is not None else reader.split,
        )
        bar_args = {"unit": "row", "unit_scale": True, "disable": not progress, "desc": "stats"}
        with tqdm(total=reader.num_rows, mininterval=0.5, **bar_args) as bar:
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

    @property
    def num_classes(self) -> int:
        return int(self.S.shape[0])

    @property
    def category_hash(self) -> str | None:
        return self.categories.hash if self.categories is not None else None

    # -------------------------------------------------------------------- accumulation
    def update(
        self,
        logits: Tensor | np.ndarray,
        labels: Tensor | np.ndarray,
        source: str | None = None,
        check_finite_logits: bool = True,
    ) -> ClassStats:
        """Fold in one batch: logits [R, K+1] (background last), labels [R] in {-1, 0..K-1, K}.

        Only positives accumulate. Bad input (shape, K, label range, NaN/inf in any row) raises a
        `PcbkitError` whose message starts with `source` (e.g. the shard). A caller that has
        already verified finiteness (the dump reader does, per chunk) may pass
        `check_finite_logits=False` to skip the full scan (~10% of the time); NaN/+inf in the rows
        used are still caught by `batch_sums`. Returns self.
        """
        logits_t = torch.as_tensor(logits)
        labels_t = torch.as_tensor(labels)
        k = check_logits_labels(logits_t, labels_t, self.num_classes, source)
        bg = int((labels_t == k).sum())
        ign = int((labels_t == IGNORE_LABEL).sum())
        if check_finite_logits:  # every row, -inf included (one cheap reduction per chunk)
            check_finite(logits_t, source)
        if logits_t.device == self.S.device:
            batch_sums(logits_t, labels_t, k, out=(self.S, self.n, self.H), source=source)
        else:
            b = batch_sums(logits_t, labels_t, k, source=source)
            self.S += b.S.to(self.S.device)
            self.n += b.n.to(self.n.device)
            self.H += b.H.to(self.H.device)
        r = int(labels_t.shape[0])
        self.rows += r
        self.background += bg
        self.ignored += ign
        return self

    @staticmethod
    def merge(a: ClassStats, b: ClassStats) -> ClassStats:
        """Sum two statistics of the same category space (shards, workers): S, n, H and row counts add.

        The regime-diagnostic sums (`instances`, `clip_*`) are not carried over: the merged M differs,
        and instance counts of two sources may overlap; recompute them (`pcb_analysis.regime`)."""
        if a.num_classes != b.num_classes:
            raise PcbkitError(f"ClassStats.merge: K differs ({a.num_classes} vs {b.num_classes})")
        if a.categories is not None and b.categories is not None:
            a.categories.check_same(b.categories, f"ClassStats.merge ({b.source or 'second operand'})")
        if a.split == b.split or b.split is None:
            split = a.split
        elif a.split is None:
            split = b.split
        else:
            split = f"{a.split}+{b.split}"
        sources = [s for s in (a.source, b.source) if s]
        return ClassStats(
            S=a.S + b.S.to(a.S.device),
            n=a.n + b.n.to(a.n.device),
            H=a.H + b.H.to(a.H.device),
            categories=a.categories if a.categories is not None else b.categories,
            source=" + ".join(dict.fromkeys(sources)),
            split=split,
            rows=a.rows + b.rows,
            background=a.background + b.background,
            ignored=a.ignored + b.ignored,
        )

    def __add__(self, other: ClassStats) -> ClassStats:
        if not isinstance(other, ClassStats):
            return NotImplemented
        return ClassStats.merge(self, other)

    # -------------------------------------------------------------------- derived
    def empty_classes(self) -> Tensor:
        """[K] bool: classes with no positive (their confusion row is undefined)."""
        return self.n <= 0

    def confusion(self, warn: bool = True) -> Tensor:
        """Row-normalised confusion matrix M [K, K] float64; empty rows -> identity rows (one warning)."""
        M, empty = row_normalise(self.S, self.n)
        n_empty = int(empty.sum())
        if warn and n_empty:
            logger.warning(
                "%d of %d classes have no positives%s: their confusion rows are undefined and replaced by "
                "identity rows (no correction for them)",
                n_empty,
                self.num_classes,
                f" in {self.source}" if self.source else "",
            )
        return M

    def mean_score(self, warn: bool = True) -> Tensor:
        """Mean score s [K] float64: the diagonal of `confusion()` (1.0 for empty classes)."""
        return torch.diagonal(self.confusion(warn=warn)).clone()

    def hard_confusion(self) -> Tensor:
        """Row-normalised arg-max counts H[i] / n[i] [K, K] float64 (identity rows for empty classes)."""
        M, _ = row_normalise(self.H.to(torch.float64), self.n)
        return M

    def bucket_mean_scores(self) -> dict[str, float]:
        """Mean of the diagonal over non-empty classes per r/c/f bucket (needs `categories`); NaN if none."""
        if self.categories is None:
            raise PcbkitError("ClassStats.bucket_mean_scores: no category space attached")
        s = self.mean_score(warn=False)
        empty = self.empty_classes()
        out: dict[str, float] = {}
        for f in ("r", "c", "f"):
            idx = [i for i in self.categories.bucket_indices(f) if not bool(empty[i])]
            out[f] = float(s[idx].mean()) if idx else float("nan")
        return out

    def summary_lines(self, rows: int | None = None) -> list[str]:
        """Human summary (needs `categories`): rows read (default `self.rows`), positives, classes
        without positives (per bucket, first names), mean score per r/c/f bucket and over all."""
        if self.categories is None:
            raise PcbkitError("ClassStats.summary_lines: no category space attached")
        cats = self.categories
        k = self.num_classes
        empty = self.empty_classes()
        lines = [
            f"rows read: {self.rows if rows is None else rows:,}; positives: {int(self.n.sum()):,}; "
            f"background: {self.background:,}; ignored: {self.ignored:,} (split {self.split or '?'}, K={k})",
        ]
        empty_idx = torch.nonzero(empty).flatten().tolist()
        if empty_idx:
            per_bucket = {f: sum(bool(empty[i]) for i in cats.bucket_indices(f)) for f in ("r", "c", "f")}
            by_bucket = ", ".join(f"{f} {count}" for f, count in per_bucket.items())
            names = [cats.names[i] for i in empty_idx]
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            lines.append(f"classes with no positives: {len(empty_idx)} of {k} ({by_bucket}): {shown}")
        else:
            lines.append(f"classes with no positives: 0 of {k}")
        bucket_means = self.bucket_mean_scores()
        parts = []
        for f in ("r", "c", "f"):
            filled = sum(1 for i in cats.bucket_indices(f) if not bool(empty[i]))
            total = len(cats.bucket_indices(f))
            mean = f"{bucket_means[f]:.4f}" if filled else "-"
            parts.append(f"{f} {mean} ({filled}/{total} classes)")
        filled_all = torch.nonzero(~empty).flatten()
        overall = f"{float(self.mean_score(warn=False)[filled_all].mean()):.4f}" if len(filled_all) else "-"
        lines.append("mean score (diagonal, non-empty classes): " + "; ".join(parts) + f"; all {overall}")
        return lines

    # -------------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        """Provenance stored beside the arrays (JSON-serialisable)."""
        meta: dict[str, Any] = {
            "kind": FILE_KIND,
            "schema_version": SCHEMA_VERSION,
            "num_classes": self.num_classes,
            "categories": self.categories.to_dict() if self.categories is not None else None,
            "category_hash": self.category_hash,
            "source": self.source,
            "split": self.split,
            "counts": {
                "rows": self.rows,
                "positives": int(self.n.sum()),
                "background": self.background,
                "ignored": self.ignored,
                "empty_classes": int(self.empty_classes().sum()),
            },
            "torch_version": torch.__version__,
            "extra": self.extra,
        }
        if self.instances is not None:  # ground-truth annotations on the images read (regime diagnostics)
            meta["counts"]["instances"] = int(self.instances.sum())
        return meta

    def save(self, path: str | Path) -> Path:
        """Write an `.npz` atomically: S, n, H, CM (= confusion()), MS (= mean_score()), empty, meta JSON."""
        path = Path(path)
        cm = self.confusion(warn=False)
        arrays = {
            "S": self.S.detach().cpu().numpy(),
            "n": self.n.detach().cpu().numpy(),
            "H": self.H.detach().cpu().numpy(),
            "CM": cm.cpu().numpy(),
            "MS": torch.diagonal(cm).cpu().numpy().copy(),
            "empty": self.empty_classes().cpu().numpy(),
            "meta": np.array(json.dumps(self.metadata())),
        }
        for name, dtype in _OPTIONAL_ARRAYS.items():
            arr = getattr(self, name)
            if arr is not None:
                arrays[name] = arr.detach().cpu().numpy().astype(dtype)

        def _write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" to the temp name
                np.savez_compressed(f, **arrays)

        write_with_atomic(path, _write)
        return path

    @classmethod
    def load(cls, path: str | Path, categories: CategorySpace | None = None) -> ClassStats:
        """Read a file written by `save`, validating it; with `categories`, refuse a different space."""
        path = Path(path)
        arrays = read_npz(path, (*_ARRAYS, "meta"), _OPTIONAL_ARRAYS)
        meta = read_meta(arrays, path, FILE_KIND, SCHEMA_VERSION)
        S, n, H = arrays["S"], arrays["n"], arrays["H"]
        k = meta_count(meta, "num_classes", path)
        if S.shape != (k, k) or n.shape != (k,) or H.shape != (k, k):
            raise input_error(
                path,
                f"array shapes S {S.shape}, n {n.shape}, H {H.shape} "
                f"do not match K={k} in 'meta.num_classes'",
            )
        if S.dtype != np.float64 or n.dtype != np.int64 or H.dtype != np.int64:
            raise input_error(
                path, f"array dtypes S {S.dtype}, n {n.dtype}, H {H.dtype}; expected float64, int64, int64"
            )
        if not np.isfinite(S).all() or (S < 0).any() or (n < 0).any() or (H < 0).any():
            raise input_error(path, "arrays S, n, H must be finite and non-negative")
        space = None
        if meta.get("categories") is not None:
            space = CategorySpace.from_dict(meta["categories"], source=path)
            if meta.get("category_hash") not in (None, space.hash):
                raise input_error(
                    path,
                    f"field 'meta.category_hash' {meta['category_hash']} does not match its category space",
                )
        if categories is not None:
            if space is None:
                raise input_error(
                    path,
                    f"carries no category space; expected hash {categories.hash} "
                    f"(K={categories.num_classes})",
                )
            categories.check_same(space, str(path))
        optional: dict[str, Tensor] = {}
        for name, dtype in _OPTIONAL_ARRAYS.items():
            if name in arrays:
                arr = arrays[name]
                if arr.shape != (k,) or arr.dtype != dtype:
                    raise input_error(
                        path,
                        f"array {name!r}: {arr.dtype} {list(arr.shape)}, expected {np.dtype(dtype)} [{k}]",
                    )
                if not np.isfinite(arr).all() or (arr < 0).any():
                    raise input_error(path, f"array {name!r} must be finite and non-negative")
                optional[name] = torch.from_numpy(arr.copy())
        rows, background, ignored = (meta_count(meta, f"counts.{c}", path, 0)
                                     for c in ("rows", "background", "ignored"))
        return cls(
            S=torch.from_numpy(S.copy()),
            n=torch.from_numpy(n.copy()),
            H=torch.from_numpy(H.copy()),
            categories=space,
            source=str(meta.get("source") or ""),
            split=meta.get("split"),
            rows=rows,
            background=background,
            ignored=ignored,
            extra=dict(meta.get("extra") or {}),
            **optional,
        )
