"""`pcbkit calibrate`: post-hoc calibration inside post-processing, evaluated on LVIS (Table 1 / Table 4).

R proposals, K foreground classes; logits [R, K+1], background = column K; q = softmax over all
K+1 logits. Every statistic is a score transform q [R, K+1] -> q~ [R, K+1] that keeps the
background probability (docs/method.md §3), applied BEFORE the standard post-processing
(`pcb_train.backends.select_detections`: score > 1e-4, class-wise NMS 0.5, top 300 per image;
masks are then predicted for the calibrated detections).

Two modes, one post-processing function:
- in-model (`calibrate_model`): ONE backbone + RPN + box-head pass per batch for all statistics
  (`backend.infer(images, {name: transform})`); LVIS results per statistic with masks; mask and
  box AP, standard and fixed.

Fixed AP (Dave et al. 2021, "The Devil is in the Details") replaces the 300-per-image cap by a
budget of 10,000 detections per class over the split. Calibration moves scores across classes,
which the per-image cap turns into a change of which detections exist at all, so fixed AP is the
fairer comparison of statistics. Post-processing therefore runs uncapped (score > 1e-4 and NMS
only); its detections are sorted by score, so the standard results are exactly the first 300 of
each image, and the uncapped ones stream into a per-class top-10,000 (`PerClassTop`), written as
`<split>-<stat>-fixed.json` and evaluated with lvis-api's fixed-AP protocol. `fixed_ap=False`
(`--no-fixed-ap`) skips it (masks are then computed for the capped detections only).
- offline (`calibrate_dump`): no model. From a FULL dump (not positives-only) written with
  per-class regressed boxes (`pcbkit dump-logits --boxes per-class`), per image: q from the
  stored logits with the backend's own softmax, the transform, then the SAME `select_detections`
  on the stored boxes (original pixels, as `infer` uses). Box AP only (a dump has no masks). On
  the same model, split and batching it reproduces the in-model detections bit for bit whenever
  the logits are float16-representable; in general the only difference is the dump's float16
  storage of the logits (relative rounding <= 2^-11 per logit).

Rows of the table (`build_rows`):
    none, ms, cm, cm-bayes     docs/method.md §3 (`none` is the identity: the model's own detections)
    norcal(gamma)              p~[j] ∝ p[j] / n_img[j]^gamma, n_img = training image counts of the
                               statistics' category space (NorCal-style frequency rescaling)
    logit-adj(tau)             z[:K] - tau * log(prior), prior = training INSTANCE frequency
                               (`instance_count` of the ground truth's categories)

Why logit adjustment is offered with the instance prior only (the math): with background kept as
§3 prescribes, the adjusted foreground distribution is
    p~[j] = exp(z_j - tau log pi_j) / sum_k exp(z_k - tau log pi_k) = (p_j / pi_j^tau) / sum_k (p_k / pi_k^tau),
which is exactly `norcal` with freq = pi and gamma = tau (the normalisation of pi cancels). So
logit adjustment with the image-frequency prior IS norcal(gamma = tau) and would only duplicate a
row; the two differ only through the prior. `logit-adj(tau)` therefore uses the training
instance counts (the label prior of Menon et al.), and `norcal(gamma)` the image counts (NorCal's
frequency; LVIS's r/c/f are also defined on image counts). Both are implemented by the same
`frequency_correction` calibrator. (A softmax over all K+1 adjusted logits would also move the
background probability, which §3 rules out for every statistic.)

Where the statistics come from is recorded with the results: statistics of the evaluated split
are the paper's upper bound (Table 1); of the training split, Table 4's train-set matrix.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.atomic import write_json_atomic, write_text_atomic
from pcb_analysis.calibration import Calibrator
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.lvis_eval import FIXED_AP_PER_CLASS
from pcb_analysis.stats import ClassStats
from pcb_train.backends import (
    ScoreTransform,
    detections_to_lvis,
    identity,
    select_detections,
    softmax_probabilities,
)

logger = logging.getLogger(__name__)

STAT_CHOICES = ("none", "ms", "cm", "cm-bayes")
DEFAULT_STATS = ("none", "ms", "cm")
UPPER_BOUND = "upper bound (same split, Table 1)"
TRAIN_MATRIX = "train-set matrix (Table 4)"
MASK_THRESHOLD = 0.5
# Bumped whenever the results or metrics a calibration writes change meaning (cached study steps rerun).
RESULTS_PROTOCOL = "2: fixed AP on uncapped per-class top-10,000 results"
OFFLINE_CHUNK_ROWS = 2048  # rows read per chunk (per-class boxes: 2048 x 4812 float32 = 39 MB at K = 1,203)


# --------------------------------------------------------------------------------------------
# rows of the table: one calibrator each


@dataclass(frozen=True)
class StatRow:
    """One statistic of the table: display name, file-safe slug, and its score transform."""

    name: str
    slug: str
    transform: ScoreTransform
    family: str  # "none" | "ms" | "cm" | "cm-bayes" | "norcal" | "logit-adj"
    param: float | None = None


def _num(x: float) -> str:
    """0.5 -> '0.5', 1.0 -> '1' (names and file names)."""
    return f"{x:g}"


def parse_grid(text: str | None, option: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0); None or '' -> (). Values must be finite and >= 0."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise PcbkitError(f"{option}: {part!r} is not a number (expected e.g. 0,0.5,1)") from None
        if not math.isfinite(v) or v < 0:
            raise PcbkitError(f"{option}: values must be finite and >= 0 (got {part})")
        out.append(v)
    return tuple(dict.fromkeys(out))


def instance_prior(categories: Sequence[Mapping[str, Any]], space: CategorySpace, source: str | Path) -> Tensor:
    """Training instance counts [K] (contiguous order) from an LVIS `categories` list."""
    by_id = {}
    for c in categories:
        try:
            by_id[int(c["id"])] = c.get("instance_count")
        except (KeyError, TypeError, ValueError) as err:
            raise input_error(source, f"field 'categories': malformed entry ({err!r})") from err
    counts = [by_id.get(cid) for cid in space.ids]
    if any(v is None for v in counts):
        raise input_error(
            source,
            "field 'categories[].instance_count' is missing: logit adjustment (--tau) needs training instance "
            "counts (with image counts it equals norcal: use --gamma)",
        )
    try:
        return torch.tensor([float(v) for v in counts], dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise input_error(source, f"field 'categories[].instance_count': not a number ({err})") from err


def build_rows(
    stats: ClassStats,
    stat_names: Sequence[str],
    *,
    ridge: float = 0.0,
    gammas: Sequence[float] = (),
    taus: Sequence[float] = (),
    prior: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> list[StatRow]:
    """The table's rows, each calibrator prepared once (M^-1 computed once) and moved to `device` once.

    `none` is the identity transform (the model's own scores, bit for bit). norcal rows use the
    training image counts of `stats.categories`; logit-adj rows use `prior` (training instances).
    """
    rows: list[StatRow] = []
    k = stats.num_classes
    for name in dict.fromkeys(stat_names):
        if name not in STAT_CHOICES:
            raise PcbkitError(f"--stat: unknown statistic {name!r}; choose from {', '.join(STAT_CHOICES)}")
        if name == "none":
            rows.append(StatRow("none", "none", identity, "none"))
            continue
        cal = Calibrator.build(name, stats, ridge).to(device)
        rows.append(StatRow(name, name, cal, name))
    if gammas:
        image_counts = stats.categories.image_count if stats.categories is not None else ()
        if not any(image_counts):
            raise PcbkitError(
                "--gamma (norcal) needs training image counts: the statistics' category space has none "
                "(its ground truth's categories carry no 'image_count')"
            )
        freq = torch.tensor(image_counts, dtype=torch.float64)
        for g in gammas:
            cal = Calibrator.build("norcal", None, num_classes=k, freq=freq, gamma=g).to(device)
            rows.append(StatRow(f"norcal({_num(g)})", f"norcal-g{_num(g)}", cal, "norcal", g))
    if taus:
        if prior is None:
            raise PcbkitError("--tau (logit adjustment) needs the training instance counts of the categories")
        for t in taus:
            cal = Calibrator.build("norcal", None, num_classes=k, freq=prior, gamma=t).to(device)
            rows.append(StatRow(f"logit-adj({_num(t)})", f"logit-adj-t{_num(t)}", cal, "logit-adj", t))
    if not rows:
        raise PcbkitError("nothing to evaluate: give --stat, --gamma or --tau")
    return rows


# --------------------------------------------------------------------------------------------
# inputs: statistics, ground truth, where the statistics come from


def load_statistics(path: str | Path, categories: CategorySpace, gt: str | Path) -> ClassStats:
    """Load a statistics file and refuse one whose category space is not the ground truth's."""
    stats = ClassStats.load(path)
    if stats.categories is None:
        raise input_error(path, f"carries no category space; cannot check it against the ground truth {gt}")
    if stats.categories.hash != categories.hash:
        raise input_error(
            gt,
            f"categories (hash {categories.hash}, K={categories.num_classes}) differ from the statistics' category "
            f"space in {path} (hash {stats.categories.hash}, K={stats.categories.num_classes})",
        )
    return stats


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def statistics_relation(stats: ClassStats, eval_split: str, gt: str | Path) -> dict[str, Any]:
    """Which study the statistics serve: the same split (upper bound) or another (train-set matrix).

    Same split: the split names agree, or the dump the statistics were read from records this very
    ground-truth file."""
    from pcb_analysis.dumps import MANIFEST_NAME

    same = stats.split is not None and stats.split == eval_split
    if not same and stats.source:
        manifest = Path(stats.source) / MANIFEST_NAME
        try:
            prov = json.loads(manifest.read_text(encoding="utf-8")).get("provenance", {})
            same = bool(prov.get("gt")) and _same_file(prov["gt"], gt)
        except (OSError, ValueError, AttributeError):
            pass
    split = stats.split if stats.split is not None else "?"
    if same:
        relation, label = "same-split", UPPER_BOUND
    elif "train" in split.lower():
        relation, label = "train-split", f"{TRAIN_MATRIX}, statistics of split {split!r}"
    else:
        relation, label = "other-split", f"statistics of split {split!r}"
    return {"split": stats.split, "source": stats.source, "relation": relation, "label": label}


def ground_truth_for(gt: str | Path, image_ids: Sequence[int], all_ids: Sequence[int]) -> Any:
    """The evaluation's ground-truth index, restricted to `image_ids` when they are a strict subset
    (e.g. --max-images): images never run must not count as misses."""
    from pcb_analysis.lvis_eval import load_ground_truth
    from pcb_train.data import load_lvis_json

    wanted = set(int(i) for i in image_ids)
    if wanted == set(int(i) for i in all_ids):
        return load_ground_truth(gt)
    data = load_lvis_json(gt)
    sub = dict(data)
    sub["images"] = [im for im in data["images"] if int(im["id"]) in wanted]
    sub["annotations"] = [a for a in data["annotations"] if int(a["image_id"]) in wanted]
    index = load_ground_truth(sub)
    index.source = f"{gt} ({len(sub['images'])} of {len(data['images'])} images)"
    return index


# --------------------------------------------------------------------------------------------
# results files (streamed, atomic) and evaluation


class ResultsFile:
    """An LVIS results list streamed to a temporary sibling of `target`, renamed on `commit()`.

    Memory stays one image's entries; a failed run removes the temporary (`discard()`), so no
    partial results file is ever left under the final name."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.tmp = target.parent / f".{target.name}.{os.getpid()}.partial"
        self.count = 0
        self._f: io.TextIOWrapper | None = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115
        self._f.write("[")
        try:
            import orjson

            self._dumps: Callable[[Any], str] = lambda e: orjson.dumps(e).decode("utf-8")
        except ImportError:  # pragma: no cover - orjson is a declared dependency
            self._dumps = lambda e: json.dumps(e, separators=(",", ":"))

    def add(self, entries: Sequence[Mapping[str, Any]]) -> None:
        assert self._f is not None
        for e in entries:
            self._f.write(("," if self.count else "") + self._dumps(e))
            self.count += 1

    def finish(self) -> None:
        """Close the list and the file (the temporary is then a complete results file)."""
        if self._f is None:
            return
        self._f.write("]\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None

    def commit(self) -> None:
        self.finish()
        os.replace(self.tmp, self.target)

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self.tmp.unlink(missing_ok=True)


class PerClassTop:
    """The `per_class` highest-scoring detections of every class over a whole split: the input of
    fixed AP (Dave et al. 2021: no per-image cap, 10,000 detections per class).

    Entries arrive image by image, uncapped; a class's list is pruned to its top `per_class`
    whenever it reaches twice that, so memory stays <= 2 x per_class entries per class. Ties in
    score keep the earlier entry (arrival order), so the result is deterministic."""

    def __init__(self, per_class: int) -> None:
        if per_class < 1:
            raise ValueError(f"PerClassTop: per_class must be >= 1, got {per_class}")
        self.per_class = int(per_class)
        self._by_class: dict[int, list[tuple[float, int, dict[str, Any]]]] = {}
        self._seq = 0

    def add(self, entries: Sequence[dict[str, Any]]) -> None:
        for e in entries:
            bucket = self._by_class.setdefault(int(e["category_id"]), [])
            bucket.append((-float(e["score"]), self._seq, e))
            self._seq += 1
            if len(bucket) >= 2 * self.per_class:
                self._prune(bucket)

    def _prune(self, bucket: list[tuple[float, int, dict[str, Any]]]) -> None:
        bucket.sort(key=lambda x: (x[0], x[1]))
        del bucket[self.per_class :]

    def drain_into(self, results: ResultsFile) -> None:
        """Write every class's top entries (classes by id, each by decreasing score) and forget them."""
        for cat in sorted(self._by_class):
            bucket = self._by_class[cat]
            self._prune(bucket)
            results.add([e for _, _, e in bucket])
        self._by_class.clear()


def _fixed_ap_tops(rows: Sequence[StatRow], fixed_ap: bool) -> dict[str, PerClassTop] | None:
    """One per-class top-10,000 accumulator per row when fixed AP is evaluated, else None."""
    return {row.slug: PerClassTop(FIXED_AP_PER_CLASS) for row in rows} if fixed_ap else None


def _add_image(results: ResultsFile, top: PerClassTop | None, entries: list[dict[str, Any]], cap: int) -> None:
    """One image's LVIS entries of one row, sorted by score (uncapped when `top` is given): the
    first `cap` (all when negative) to the standard results, every one to the fixed-AP top."""
    results.add(entries[:cap] if cap >= 0 else entries)
    if top is not None:
        top.add(entries)


def evaluate_results(
    gt_index: Any, path: Path, iou_types: Sequence[str], count: int, fixed: tuple[Path, int] | None = None
) -> dict[str, dict[str, float]]:
    """Standard and fixed AP per IoU type ({"segm": ..., "segm_fixed": ..., "bbox": ..., ...}).

    Standard AP on `path` (<= 300 detections per image); fixed AP on `fixed` = (path, count), the
    uncapped per-class top-10,000 results, when given (else no `_fixed` entries). NaN everywhere
    when there are no detections (lvis-api cannot evaluate an empty list)."""
    from pcb_analysis.lvis_eval import evaluate_full, gc_paused, load_ground_truth, load_results

    index = load_ground_truth(gt_index)

    def parsed(p: Path) -> dict[str, Any]:
        """The results file parsed once for every IoU type (a segm parse keeps the boxes too)."""
        with gc_paused():
            first = load_results(p, index, iou_types[0])
        if bool(first.has_bbox.all()):
            return dict.fromkeys(iou_types, first)
        return {t: first if t == iou_types[0] else load_results(p, index, t) for t in iou_types}

    std = parsed(path) if count else {}
    fix = parsed(fixed[0]) if fixed is not None and fixed[1] else {}
    if count == 0:
        logger.warning("%s: no detections; its metrics are undefined", path)
    out: dict[str, dict[str, float]] = {}
    for t in iou_types:
        out[t] = evaluate_full(index, std[t], t).metrics if count else {"AP": float("nan")}
        if fixed is not None:
            out[f"{t}_fixed"] = evaluate_full(index, fix[t], t, fixed=True).metrics if fix else {"AP": float("nan")}
    return out


@dataclass
class CalibrationReport:
    """The evaluated table: one entry per row, plus where everything came from."""

    mode: str  # "model" | "dump"
    split: str
    gt: str
    statistics: dict[str, Any]
    images: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from pcb_analysis.lvis_eval import nan_to_none

        rows = []
        for r in self.rows:
            rows.append({**r, "metrics": {k: nan_to_none(v) for k, v in r["metrics"].items()}})
        return {
            "mode": self.mode,
            "split": self.split,
            "gt": self.gt,
            "statistics": self.statistics,
            "images": self.images,
            "rows": rows,
            "provenance": self.provenance,
            "seconds": self.seconds,
        }


# table columns: (header, evaluation key, metric)
MODEL_COLUMNS = (
    ("AP", "segm", "AP"),
    ("APr", "segm", "APr"),
    ("APc", "segm", "APc"),
    ("APf", "segm", "APf"),
    ("APb", "bbox", "AP"),
    ("AP-fixed", "segm_fixed", "AP"),
    ("APb-fixed", "bbox_fixed", "AP"),
)
DUMP_COLUMNS = (
    ("APb", "bbox", "AP"),
    ("APb-r", "bbox", "APr"),
    ("APb-c", "bbox", "APc"),
    ("APb-f", "bbox", "APf"),
    ("APb-fixed", "bbox_fixed", "AP"),
)


def _columns(mode: str) -> tuple[tuple[str, str, str], ...]:
    return MODEL_COLUMNS if mode == "model" else DUMP_COLUMNS


def _value(row: Mapping[str, Any], key: str, metric: str) -> float:
    v = row["metrics"].get(key, {}).get(metric)
    return float("nan") if v is None else float(v)


def format_table(report: CalibrationReport) -> str:
    """One line per statistic (AP in percent; '-' where undefined)."""
    cols = _columns(report.mode)
    width = max([len("stat"), *(len(r["stat"]) for r in report.rows)]) + 2
    lines = [
        f"split {report.split!r}, {report.images} image(s); statistics: {report.statistics.get('label')} "
        f"[{report.statistics.get('file')}]",
        f"{'stat':<{width}}" + "".join(f"{h:>10}" for h, _, _ in cols) + f"{'dets':>10}",
    ]
    for r in report.rows:
        cells = []
        for _, key, metric in cols:
            v = _value(r, key, metric)
            cells.append(f"{'-':>10}" if math.isnan(v) or v < 0 else f"{100 * v:10.2f}")
        lines.append(f"{r['stat']:<{width}}" + "".join(cells) + f"{r['detections']:>10}")
    return "\n".join(lines)


def table_csv(report: CalibrationReport) -> str:
    """The table as CSV (fractions, not percent; empty where undefined)."""
    cols = _columns(report.mode)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stat", *(h for h, _, _ in cols), "detections", "results", "statistics"])
    for r in report.rows:
        vals = []
        for _, key, metric in cols:
            v = _value(r, key, metric)
            vals.append("" if math.isnan(v) or v < 0 else repr(v))
        w.writerow([r["stat"], *vals, r["detections"], r["results"], report.statistics.get("relation")])
    return buf.getvalue()


def _finish(
    report: CalibrationReport,
    files: Mapping[str, ResultsFile],
    rows: Sequence[StatRow],
    gt_index: Any,
    iou_types: Sequence[str],
    out: Path,
    metrics_name: str,
    tops: Mapping[str, PerClassTop] | None = None,
) -> None:
    """Evaluate every finished results file, write the metrics (JSON + CSV) and commit the results.

    With `tops` (per row, the uncapped per-class top detections), each row also gets a
    `<results>-fixed.json` results file, evaluated for fixed AP."""
    fixed_files: dict[str, ResultsFile] = {}
    try:
        for row in rows:
            f = files[row.slug]
            f.finish()
            fixed = None
            if tops is not None:
                ff = fixed_files[row.slug] = ResultsFile(f.target.with_name(f.target.stem + "-fixed.json"))
                tops[row.slug].drain_into(ff)
                ff.finish()
                fixed = (ff.tmp, ff.count)
            report.rows.append(
                {
                    "stat": row.name,
                    "family": row.family,
                    "param": row.param,
                    "results": f.target.name,
                    "detections": f.count,
                    "fixed_results": fixed_files[row.slug].target.name if row.slug in fixed_files else None,
                    "fixed_detections": fixed_files[row.slug].count if row.slug in fixed_files else None,
                    "metrics": evaluate_results(gt_index, f.tmp, iou_types, f.count, fixed),
                }
            )
        write_json_atomic(out / f"{metrics_name}.json", report.to_dict(), indent=2)
        write_text_atomic(out / f"{metrics_name}.csv", table_csv(report))
    except BaseException:
        for ff in fixed_files.values():
            ff.discard()
        raise
    for f in [*files.values(), *fixed_files.values()]:
        f.commit()


def _open_results(out: Path, split: str, rows: Sequence[StatRow], suffix: str = "") -> dict[str, ResultsFile]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise input_error(out, f"cannot create the output folder ({err.strerror})") from err
    files: dict[str, ResultsFile] = {}
    try:
        for row in rows:
            files[row.slug] = ResultsFile(out / f"{split}-{row.slug}{suffix}.json")
    except BaseException:
        for f in files.values():
            f.discard()
        raise
    return files


# --------------------------------------------------------------------------------------------
# in-model


@dataclass(frozen=True)
class CalibrateConfig:
    """Options of `pcbkit calibrate` (in-model mode unless `dump` is given)."""

    stats: Path
    gt: Path
    out: Path
    stat: tuple[str, ...] = DEFAULT_STATS
    checkpoint: Path | None = None
    config: Path | None = None
    images: Path | None = None
    dump: Path | None = None
    split: str | None = None
    ridge: float = 0.0
    gammas: tuple[float, ...] = ()
    taus: tuple[float, ...] = ()
    max_images: int | None = None
    batch_size: int = 2
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    fixed_ap: bool = True  # also evaluate fixed AP on uncapped per-class top-10,000 results

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PcbkitError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if not 0.0 <= self.ridge <= 1.0:
            raise PcbkitError(f"--ridge must be in [0, 1] (got {self.ridge})")
        if self.dump is None:
            missing = [n for n in ("checkpoint", "config", "images") if getattr(self, n) is None]
            if missing:
                raise PcbkitError(
                    "in-model mode needs " + ", ".join(f"--{m}" for m in missing) + " (or --dump DIR for the offline mode)"
                )
        elif any(getattr(self, n) is not None for n in ("checkpoint", "config", "images", "max_images")):
            raise PcbkitError("--dump (offline mode) takes no --checkpoint, --config, --images or --max-images")


def _prior_if_needed(cfg: CalibrateConfig, categories: CategorySpace) -> Tensor | None:
    if not cfg.taus:
        return None
    from pcb_train.data import load_lvis_json

    return instance_prior(load_lvis_json(cfg.gt)["categories"], categories, cfg.gt)


def calibrate_model(cfg: CalibrateConfig) -> CalibrationReport:
    """In-model mode: one inference pass for every row, LVIS results per row, mask + box AP.

    Every input is validated before anything is written under `cfg.out`: statistics (present,
    category space = ground truth's), split (non-empty, image files present), config and
    checkpoint (class count, structure, categories)."""
    return calibrate_models([cfg])[0]


# options that must agree for several calibrations to share one inference pass
_SHARED_PASS_FIELDS = ("checkpoint", "config", "gt", "images", "split", "max_images", "batch_size", "device",
                       "num_workers", "fixed_ap")


@dataclass
class _Job:
    """One calibration (one statistics file, one output folder) inside a shared pass."""

    cfg: CalibrateConfig
    rows: list[StatRow]
    report: CalibrationReport
    files: dict[str, ResultsFile] = field(default_factory=dict)
    tops: dict[str, PerClassTop] | None = None


def calibrate_models(cfgs: Sequence[CalibrateConfig]) -> list[CalibrationReport]:
    """Several in-model calibrations of the same model and split (e.g. val-set and train-set
    statistics, Table 1 and Table 4) from ONE inference pass; each writes its own `cfg.out`
    exactly as `calibrate_model` would. The configs must agree on everything but the statistics
    and the output (checkpoint, config, gt, images, split, max_images, batching, device, fixed_ap)."""
    from tqdm import tqdm

    from pcb_train.distributed import resolve_device
    from pcb_train.inference import iter_batches, load_detector, open_split
    from pcb_train.provenance import provenance

    if not cfgs:
        raise ValueError("calibrate_models: no configuration given")
    first = cfgs[0]
    for c in cfgs[1:]:
        diff = [f for f in _SHARED_PASS_FIELDS if getattr(c, f) != getattr(first, f)]
        if diff:
            raise PcbkitError(f"calibrations sharing one pass must agree on {', '.join(diff)}")
    outs = [Path(c.out).resolve() for c in cfgs]
    if len(set(outs)) != len(outs):
        raise PcbkitError("calibrations sharing one pass need distinct output folders")
    t0 = time.perf_counter()
    for c in cfgs:
        if not Path(c.stats).is_file():
            raise input_error(c.stats, "statistics file not found")
    assert first.checkpoint is not None and first.config is not None and first.images is not None
    dataset = open_split(first.gt, first.images, max_images=first.max_images)
    categories = dataset.categories
    loaded = [load_statistics(c.stats, categories, c.gt) for c in cfgs]  # checked before the model
    device = resolve_device(first.device)
    backend, info, _ = load_detector(first.checkpoint, first.config, categories, first.gt, device)
    split = first.split or Path(first.gt).stem
    image_ids = dataset.image_ids
    all_ids = _all_image_ids(first.gt) if first.max_images is not None else image_ids
    prov = provenance(info, backend.config, first.config)
    jobs: list[_Job] = []
    for c, stats in zip(cfgs, loaded, strict=True):
        rows = build_rows(stats, c.stat, ridge=c.ridge, gammas=c.gammas, taus=c.taus,
                          prior=_prior_if_needed(c, categories), device=device)
        relation = {"file": str(c.stats), "ridge": c.ridge, **statistics_relation(stats, split, c.gt)}
        report = CalibrationReport(mode="model", split=split, gt=str(c.gt), statistics=relation,
                                   images=len(dataset), provenance=prov)
        jobs.append(_Job(c, rows, report, tops=_fixed_ap_tops(rows, c.fixed_ap)))
    gt_index = ground_truth_for(first.gt, image_ids, all_ids)
    transforms = {(j, row.slug): row.transform for j, job in enumerate(jobs) for row in job.rows}
    names = {key: f"{key[0]}:{key[1]}" for key in transforms}
    cap = int(backend.config.detections_per_image)
    uncapped = first.fixed_ap
    try:
        for job in jobs:
            job.files = _open_results(job.cfg.out, split, job.rows)
        bar = tqdm(total=len(dataset), unit="img", desc=f"calibrate {split}", disable=not first.progress,
                   mininterval=0.5)
        with bar:
            for images, targets in iter_batches(dataset, range(len(dataset)), first.batch_size, first.num_workers):
                images = [im.to(device, non_blocking=True) for im in images]
                # with fixed AP: uncapped detections (sorted by score), the capped ones are their prefix
                dets = backend.infer(
                    images, {names[k]: fn for k, fn in transforms.items()}, mask_threshold=MASK_THRESHOLD,
                    detections_per_image=-1 if uncapped else None, compact_masks=True,
                )
                caches: list[dict[int, dict[str, Any]]] = [{} for _ in images]  # one RLE per mask, per image
                for (j, slug), name in names.items():
                    job = jobs[j]
                    for d, t, cache in zip(dets[name], targets, caches, strict=True):
                        entries = detections_to_lvis(d, int(t["image_id"]), categories, cache, MASK_THRESHOLD)
                        _add_image(job.files[slug], job.tops[slug] if job.tops else None, entries, cap)
                bar.update(len(images))
        seconds = time.perf_counter() - t0
        for job in jobs:
            job.report.seconds = seconds
            _finish(job.report, job.files, job.rows, gt_index, ("segm", "bbox"), job.cfg.out, "metrics", job.tops)
    except BaseException:
        for job in jobs:
            for f in job.files.values():
                f.discard()
        raise
    return [job.report for job in jobs]


def _all_image_ids(gt: str | Path) -> list[int]:
    from pcb_train.data import load_lvis_json

    return [int(im["id"]) for im in load_lvis_json(gt)["images"]]


# --------------------------------------------------------------------------------------------
# offline, from a dump


def class_probabilities_for(backend_name: str) -> Callable[[Tensor], Tensor]:
    """The softmax the named backend scores with in-model (so the offline path gets its exact q)."""
    if backend_name == "torchvision":
        from pcb_train.backends.torchvision import PCBRoIHeads

        return PCBRoIHeads.class_probabilities
    return softmax_probabilities


def iter_dump_images(reader: Any, chunk_rows: int = OFFLINE_CHUNK_ROWS) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(image_id, logits [r, K+1] float16, regressed [r, K*4] float32) per image of a dump, in dump
    order. An image's rows are contiguous within one shard; chunks may cut them, so they are
    carried over (memory: one chunk + one image)."""
    cur: int | None = None
    parts_z: list[Tensor] = []
    parts_b: list[Tensor] = []
    columns = ("image_ids", "logits", "regressed")
    for chunk in reader.iter_chunks(rows=chunk_rows, columns=columns, as_torch=True):
        ids = chunk["image_ids"]
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        start = 0
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            if cur is not None and v != cur:
                yield cur, torch.cat(parts_z), torch.cat(parts_b)
                parts_z, parts_b = [], []
            cur = v
            parts_z.append(chunk["logits"][start : start + c])
            parts_b.append(chunk["regressed"][start : start + c])
            start += c
    if cur is not None:
        yield cur, torch.cat(parts_z), torch.cat(parts_b)


def calibrate_dump(cfg: CalibrateConfig) -> CalibrationReport:
    """Offline mode: box AP of every row from a full dump with per-class boxes, without the model."""
    from tqdm import tqdm

    from pcb_analysis.dumps import MANIFEST_NAME, DumpReader
    from pcb_train.config import ModelConfig

    t0 = time.perf_counter()
    assert cfg.dump is not None
    if not Path(cfg.stats).is_file():
        raise input_error(cfg.stats, "statistics file not found")
    categories = CategorySpace.from_lvis_json(cfg.gt)
    reader = DumpReader(cfg.dump)
    manifest = Path(cfg.dump) / MANIFEST_NAME
    if reader.categories.hash != categories.hash:
        raise input_error(
            cfg.gt,
            f"categories (hash {categories.hash}, K={categories.num_classes}) differ from the dump's {manifest} "
            f"(hash {reader.categories.hash}, K={reader.num_classes})",
        )
    if reader.regressed != "per_class":
        raise input_error(
            manifest,
            f"the dump stores regressed boxes {reader.regressed!r}; offline evaluation needs per-class boxes "
            "(rerun `pcbkit dump-logits --boxes per-class`)",
        )
    prov = reader.provenance
    dump_opts = (prov.get("config") or {}).get("dump") or {}
    if dump_opts.get("positives_only"):
        raise input_error(
            manifest, "the dump is positives-only (matched proposals only); offline evaluation needs a full dump"
        )
    stats = load_statistics(cfg.stats, categories, cfg.gt)
    model = (prov.get("config") or {}).get("model") or {}
    defaults = ModelConfig()
    score_thresh = float(model.get("score_thresh", defaults.score_thresh))
    nms_thresh = float(model.get("nms_thresh", defaults.nms_thresh))
    per_image = int(model.get("detections_per_image", defaults.detections_per_image))
    probabilities = class_probabilities_for(str(model.get("backend", "torchvision")))
    rows = build_rows(
        stats, cfg.stat, ridge=cfg.ridge, gammas=cfg.gammas, taus=cfg.taus, prior=_prior_if_needed(cfg, categories)
    )
    split = cfg.split or reader.split
    dump_ids = [int(i) for i in reader.image_ids().tolist()]
    gt_ids = _all_image_ids(cfg.gt)
    unknown = sorted(set(dump_ids) - set(gt_ids))
    if unknown:
        raise input_error(cfg.gt, f"the dump {cfg.dump} holds image ids not in this file: {unknown[:5]}")
    if not dump_ids:
        raise input_error(manifest, "the dump holds no image")
    gt_index = ground_truth_for(cfg.gt, dump_ids, gt_ids)
    relation = {"file": str(cfg.stats), "ridge": cfg.ridge, **statistics_relation(stats, split, cfg.gt)}
    report = CalibrationReport(
        mode="dump",
        split=split,
        gt=str(cfg.gt),
        statistics=relation,
        images=len(dump_ids),
        provenance={"dump": str(cfg.dump), **prov},
    )
    k = reader.num_classes
    tops = _fixed_ap_tops(rows, cfg.fixed_ap)
    files = _open_results(cfg.out, split, rows, suffix="-offline")
    try:
        with tqdm(total=len(dump_ids), unit="img", desc=f"calibrate {split} (dump)", disable=not cfg.progress) as bar:
            for image_id, logits, regressed in iter_dump_images(reader):
                dets = postprocess_records(
                    logits.float(),
                    regressed.reshape(-1, k, 4),
                    {row.slug: row.transform for row in rows},
                    probabilities,
                    score_thresh=score_thresh,
                    nms_thresh=nms_thresh,
                    detections_per_image=-1 if tops else per_image,
                )
                for slug, d in dets.items():
                    _add_image(files[slug], tops[slug] if tops else None, detections_to_lvis(d, image_id, categories),
                               per_image)
                bar.update(1)
        report.seconds = time.perf_counter() - t0
        _finish(report, files, rows, gt_index, ("bbox",), cfg.out, "metrics-offline", tops)
    except BaseException:
        for f in files.values():
            f.discard()
        raise
    return report


def postprocess_records(
    logits: Tensor,
    boxes: Tensor,
    transforms: Mapping[str, ScoreTransform],
    probabilities: Callable[[Tensor], Tensor] = softmax_probabilities,
    *,
    score_thresh: float,
    nms_thresh: float,
    detections_per_image: int,
) -> dict[str, dict[str, Tensor]]:
    """One image offline: logits [r, K+1] (background last), per-class boxes [r, K, 4] (original
    pixels) -> {name: {"boxes", "scores", "labels"}} through q = probabilities(logits), each
    transform, and `select_detections` (the function `infer` runs)."""
    q = probabilities(logits)
    out: dict[str, dict[str, Tensor]] = {}
    for name, fn in transforms.items():
        qt = fn(q)
        d = select_detections(
            qt,
            boxes,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_image=detections_per_image,
        )
        out[name] = {"boxes": d.boxes, "scores": d.scores, "labels": d.labels}
    return out


def run_calibration(cfg: CalibrateConfig) -> CalibrationReport:
    """`calibrate_dump` when `cfg.dump` is set, else `calibrate_model`."""
    return calibrate_dump(cfg) if cfg.dump is not None else calibrate_model(cfg)
