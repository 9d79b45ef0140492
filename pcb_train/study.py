"""The calibration study (paper Table 1 / Table 4) as one cached pipeline; the demo is study_demo.py.

    [synth -> train (softmax, PCB) per seed] -> dump-logits (train, val; positives only) -> stats
          -> calibrate (none, ms, cm, cm-bayes; val-set and train-set statistics)
          -> bootstrap (paired intervals, study_bootstrap.py) -> report

Each step records a fingerprint of its inputs next to its outputs (`.step-<name>.json`) and is
skipped on a rerun when the fingerprint is unchanged and its outputs exist; `force` redoes
everything. Training resumes from its last checkpoint and dumps from their last complete shard,
so an interrupted pipeline continues where it stopped. `run_study` runs the steps for a given
checkpoint on real data (no synth, no training: one model instance, bootstrap intervals only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.calibration import ROW_STATISTICS, STATISTICS
from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_analysis.folds import fold_path, fold_statistics, write_fold_statistics
from pcb_analysis.lvis_eval import MAX_DETS, lvis_equivalent_cap
from pcb_analysis.reading import CROSS_FITTED, SWEEP
from pcb_analysis.regime import diagnose, stats_from_dump
from pcb_analysis.regime_line import regime_fields
from pcb_analysis.report import markdown_table
from pcb_analysis.stats import ClassStats
from pcb_train.calibrate import RESULTS_PROTOCOL, CalibrateConfig, calibrate_models, parse_grids
from pcb_train.dump_logits import DumpLogitsConfig, dump_logits
from pcb_train.study_bootstrap import BOOT_SEED, DEFAULT_RESAMPLES, bootstrap_file
from pcb_train.study_report import write_report

logger = logging.getLogger(__name__)

STATS = ROW_STATISTICS  # every parameter-free statistic of the table, with val-set statistics
TRAIN_STATS = tuple(s for s in STATS if STATISTICS[s].needs_matrix)  # with train-set statistics too
SOURCES = ("val", "train")
# cross-fitted protocol: two halves of val by a seeded hash of the image id (docs/calibration.md §8)
CROSS_FOLDS, CROSS_SEED = 2, 0
CROSS_STATS = TRAIN_STATS  # the matrix statistics, calibrated out of fold
# knob sweeps with the val statistics (in-sample), beside the parameter-free rows at their ends:
# lambda 1 / 0 is ms / cm, ibu k = 0 (start ms) is ms, tikhonov tau = 0 is cm (docs/calibration.md §7)
SWEEPS: dict[str, str] = {"cm-diagshrink": "lambda=0.25,0.5,0.75", "cm-tikhonov": "tau=0.01,0.1,1",
                          "ibu": "k=1,2,5,10"}


@dataclass(frozen=True)
class StudyModel:
    """One detector of the study: a name, its config and (after training) its checkpoint."""

    name: str
    config: Path
    checkpoint: Path


@dataclass(frozen=True)
class StudyInputs:
    """Where the data is and where the pipeline writes."""

    train_gt: Path
    val_gt: Path
    images: Path
    work: Path  # dumps/, stats/, results/ per model
    report: Path
    train_dump_images: int | None = None  # cap on train images dumped for the train-set matrix
    val_images: int | None = None
    batch_size: int = 4
    device: str = "auto"
    progress: bool = True
    force: bool = False
    fixed_ap: bool = True  # calibrate also evaluates fixed AP (uncapped detections; the slow part on a CPU)
    bootstrap: int = DEFAULT_RESAMPLES  # image resamples of the paired intervals; 0: none
    sweeps: bool = True  # also the knob sweeps (SWEEPS) in the calibrate step's one inference pass
    step_prefix: str = ""  # names this seed's steps in the wall-time table ("" for the first seed)


@dataclass
class StepLog:
    """Wall time of every step, for the report.

    A step skipped because its outputs are up to date reports the time recorded when it last ran
    (its marker keeps it), so the table shows what the whole pipeline costs even on a cached rerun.
    """

    times: list[tuple[str, float, bool]] = field(default_factory=list)  # (step, seconds, cached)

    @property
    def total(self) -> float:
        """Seconds of every step as it ran (cached steps: their recorded time)."""
        return sum(sec for _, sec, _ in self.times)

    @property
    def this_run(self) -> float:
        """Seconds spent in the steps that ran in this invocation."""
        return sum(sec for _, sec, cached in self.times if not cached)

    def markdown(self) -> str:
        rows = [[name, f"{sec:.0f}", "cached (time of the run that made it)" if cached else "ran"]
                for name, sec, cached in self.times]
        rows.append(["**total**", f"**{self.total:.0f}**", ""])
        return markdown_table(["step", "wall s", ""], rows)


def file_fingerprint(path: Path) -> str:
    """Size and mtime (fast) of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_dir():
        parts = sorted(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                       for p in path.rglob("*") if p.is_file() and not p.name.startswith(".step-"))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    if not path.exists():
        return "missing"
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def run_step(
    log: StepLog,
    name: str,
    marker_dir: Path,
    inputs: Mapping[str, Any],
    outputs: Sequence[Path],
    fn: Callable[[], None],
    force: bool,
) -> None:
    """Run `fn` unless the recorded fingerprint of `inputs` matches and every output exists.

    The marker records the fingerprint and the step's wall time (`seconds`)."""
    marker = Path(marker_dir) / f".step-{name.replace('/', '_')}.json"
    fp = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    t0 = time.perf_counter()
    if not force and marker.is_file() and all(Path(o).exists() for o in outputs):
        try:
            recorded = json.loads(marker.read_text())
        except json.JSONDecodeError:
            recorded = {}
        if recorded.get("fingerprint") == fp:
            logger.info("step %s: up to date (cached)", name)
            log.times.append((name, float(recorded.get("seconds") or 0.0), True))
            return
    logger.info("step %s: running", name)
    fn()
    seconds = time.perf_counter() - t0
    write_json_atomic(marker, {"step": name, "fingerprint": fp, "seconds": round(seconds, 1),
                               "inputs": dict(inputs)}, indent=2)
    log.times.append((name, seconds, False))


def dump_and_stats(model: StudyModel, inp: StudyInputs, log: StepLog) -> dict[str, Path]:
    """Positive-only dumps of train and val and their statistics; returns {split: stats.npz}."""
    out: dict[str, Path] = {}
    for split in ("train", "val"):
        gt = inp.train_gt if split == "train" else inp.val_gt
        cap = inp.train_dump_images if split == "train" else inp.val_images
        dump_dir = inp.work / "dumps" / model.name / split
        stats_path = inp.work / "stats" / model.name / f"{split}.npz"
        cfg = DumpLogitsConfig(
            checkpoint=model.checkpoint, config=model.config, gt=gt, images=inp.images, split=split,
            out=dump_dir, positives_only=True, max_images=cap, batch_size=inp.batch_size,
            device=inp.device, progress=inp.progress,
        )
        ins = {"checkpoint": file_fingerprint(model.checkpoint), "gt": file_fingerprint(gt), "cap": cap}
        run_step(log, f"{inp.step_prefix}{model.name}/dump-{split}", dump_dir.parent, ins,
                 [dump_dir / "manifest.json"], lambda cfg=cfg: _fresh_dump(cfg, dump_logits, inp.force),
                 inp.force)

        def make_stats(dump_dir: Path = dump_dir, stats_path: Path = stats_path, split: str = split,
                       gt: Path = gt) -> None:
            # with the regime diagnostics' sums: gt instances on the dumped images, cm's clipped mass
            stats_from_dump(dump_dir, gt=gt, progress=inp.progress, split=split).save(stats_path)
            if split == "val":  # out-of-fold statistics for the cross-fitted protocol (same dump)
                write_fold_statistics(stats_path, fold_statistics(dump_dir, CROSS_FOLDS, CROSS_SEED, gt=gt,
                                                                  progress=inp.progress, split=split))

        folds = [fold_path(stats_path, i, CROSS_FOLDS) for i in range(1, CROSS_FOLDS + 1)]
        run_step(log, f"{inp.step_prefix}{model.name}/stats-{split}", stats_path.parent,
                 {**ins, "dump": file_fingerprint(dump_dir / "manifest.json"), "diagnostics": 1,
                  **({"folds": [CROSS_FOLDS, CROSS_SEED]} if split == "val" else {})},
                 [stats_path, *(folds if split == "val" else [])], make_stats, inp.force)
        out[split] = stats_path
    return out


def _fresh_dump(cfg: DumpLogitsConfig, dump_fn: Callable[[DumpLogitsConfig], Any], force: bool) -> None:
    """A dump of a changed checkpoint starts over; an interrupted one of the same checkpoint resumes."""
    if cfg.out.exists() and (force or (cfg.out / "manifest.json").exists()):
        shutil.rmtree(cfg.out)
    dump_fn(cfg)


def calibrate_all(
    model: StudyModel, stats: Mapping[str, Path], inp: StudyInputs, log: StepLog
) -> list[dict[str, Any]]:
    """The calibration table rows of one model: none + ms/cm/cm-bayes with val and train statistics,
    all from ONE inference pass over val (`calibrate_models`), one results folder per source. Each row
    has AP at the 300 cap, at the LVIS-equivalent cap round(300 K / 1230) ("AP_cap" ... "APf_cap", with
    "cap") and fixed AP (docs/evaluation.md §4), its results file ("results", for the bootstrap) and the
    regime fields of the statistics file it used (`pcb_analysis.regime_line`; none for `none`)."""
    k = len(json.loads(Path(inp.val_gt).read_text(encoding="utf-8"))["categories"])
    cap = lvis_equivalent_cap(k)
    common = dict(gt=inp.val_gt, checkpoint=model.checkpoint, config=model.config, images=inp.images,
                  split="val", max_images=inp.val_images, batch_size=inp.batch_size, device=inp.device,
                  progress=inp.progress, fixed_ap=inp.fixed_ap, max_dets=cap)
    out = inp.work / "results" / model.name
    # name -> (config, statistics source, protocol): None = today's in-sample val / train rows
    cfgs: dict[str, tuple[CalibrateConfig, str, str | None]] = {
        source: (CalibrateConfig(stats=stats[source], out=out / f"{source}-stats",
                                 stat=STATS if source == "val" else TRAIN_STATS, **common), source, None)
        for source in SOURCES
    }
    cfgs["cross"] = (CalibrateConfig(stats=stats["val"], out=out / "val-stats-crossfit", stat=CROSS_STATS,
                                     cross_fit=True, **common), "val", CROSS_FITTED)
    if inp.sweeps:
        cfgs["sweep"] = (CalibrateConfig(stats=stats["val"], out=out / "val-stats-sweep",
                                         stat=tuple(SWEEPS), grids=parse_grids(list(SWEEPS.values())),
                                         **common), "val", SWEEP)
    ins = {"checkpoint": file_fingerprint(model.checkpoint), "gt": file_fingerprint(inp.val_gt),
           "stats": {s: file_fingerprint(stats[s]) for s in SOURCES},
           "folds": [file_fingerprint(fold_path(stats["val"], i, CROSS_FOLDS))
                     for i in range(1, CROSS_FOLDS + 1)],
           "stat": {n: list(c.stat) for n, (c, _, _) in cfgs.items()}, "sweeps": dict(SWEEPS) if inp.sweeps
           else None, "cap": inp.val_images, "protocol": RESULTS_PROTOCOL, "fixed_ap": inp.fixed_ap,
           "max_dets": cap}
    run_step(log, f"{inp.step_prefix}{model.name}/calibrate", out, ins,
             [c.out / "metrics.json" for c, _, _ in cfgs.values()],
             lambda: calibrate_models([c for c, _, _ in cfgs.values()]), inp.force)
    rows: list[dict[str, Any]] = []
    regimes = {s: regime_fields(diagnose(ClassStats.load(stats[s]))) for s in SOURCES}
    for name, (c, source, protocol) in cfgs.items():
        report = json.loads((c.out / "metrics.json").read_text())
        for r in report["rows"]:
            if r["family"] == "none" and name != "val":
                continue  # `none` once, from the val-stats pass
            m = r["metrics"]
            rows.append({
                "model": model.name,
                "source": "-" if r["family"] == "none" else source,
                "stat": r["family"] if protocol != SWEEP else r["stat"],
                **({"protocol": protocol} if protocol else {}),
                **({"family": r["family"], "knob": r.get("knob"), "value": r.get("value")}
                   if protocol == SWEEP else {}),
                "AP": m["segm"]["AP"], "APr": m["segm"]["APr"], "APc": m["segm"]["APc"],
                "APf": m["segm"]["APf"],
                "APb": m["bbox"]["AP"], "cap": cap,
                **{f"{k}_cap": m.get(f"segm@{cap}", m["segm"]).get(k) for k in ("AP", "APr", "APc", "APf")},
                "classes": k,
                "AP_fixed": m.get("segm_fixed", {}).get("AP"),
                "results": str(c.out / r["results"]),
                # cross-fitted rows: the regime of the full val statistics (each fold's is in its file)
                **({} if r["family"] == "none" else regimes[source]),
            })
    return rows


def bootstrap_model(
    model: StudyModel, rows: Sequence[Mapping[str, Any]], inp: StudyInputs, log: StepLog
) -> Path | None:
    """The bootstrap step of one model's rows (`study_bootstrap.bootstrap_file`); None when off."""
    if inp.bootstrap <= 0:
        return None
    out = inp.work / "bootstrap" / f"{model.name}.json"
    rows = [r for r in rows if r.get("protocol") != SWEEP]  # sweeps are plotted, not compared
    files = sorted({str(r["results"]) for r in rows})
    cap = next((int(r["cap"]) for r in rows if r.get("cap") is not None), None)
    cap = None if cap == MAX_DETS else cap  # at 300 the capped metrics are the standard ones
    ins = {"results": {f: file_fingerprint(Path(f)) for f in files}, "gt": file_fingerprint(inp.val_gt),
           "resamples": inp.bootstrap, "seed": BOOT_SEED, "cap": cap, "version": 2}
    run_step(log, f"{inp.step_prefix}{model.name}/bootstrap", out.parent, ins, [out],
             lambda: bootstrap_file(rows, inp.val_gt, out, inp.bootstrap, inp.progress, cap), inp.force)
    return out


def run_study(
    name: str, config: Path, checkpoint: Path, inp: StudyInputs
) -> Path:
    """The study for one existing checkpoint on real data (e.g. LVIS v0.5/v1): no synth, no training."""
    return run_study_models([StudyModel(name=name, config=config, checkpoint=checkpoint)], inp, title=name)


def run_study_models(models: Sequence[StudyModel], inp: StudyInputs, *, title: str) -> Path:
    """The study for existing checkpoints side by side (one report; the first model is the reference of
    the comparisons, `pcb_analysis.reading.model_pairs`). Model names must differ."""
    if not models:
        raise ApiMisuseError("run_study_models: no models")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise PcbkitError(f"study: model names must differ (got {', '.join(names)})")
    for m in models:
        for p, what in ((m.config, "config"), (m.checkpoint, "checkpoint")):
            if not Path(p).exists():
                raise PcbkitError(f"{p}: {what} of model {m.name!r} not found")
    for p, what in ((inp.train_gt, "train ground truth"), (inp.val_gt, "val ground truth"),
                    (inp.images, "image directory")):
        if not Path(p).exists():
            raise PcbkitError(f"{p}: {what} not found")
    log = StepLog()
    t0 = time.perf_counter()
    stats = {m.name: dump_and_stats(m, inp, log) for m in models}
    rows: list[dict[str, Any]] = []
    boots: list[Path] = []
    for m in models:
        mine = calibrate_all(m, stats[m.name], inp, log)
        rows += mine
        boot = bootstrap_model(m, mine, inp, log)
        if boot is not None:
            boots.append(boot)
    which = (f"checkpoint `{models[0].checkpoint}` (config `{models[0].config}`)" if len(models) == 1
             else "the checkpoints " + ", ".join(f"`{m.name}`: `{m.checkpoint}` (config `{m.config}`)"
                                                 for m in models) + f", compared against `{models[0].name}`")
    preamble = (
        f"Produced by `pcbkit study` for {which} on `{inp.val_gt}`, "
        f"with statistics from positive proposals of `{inp.train_gt}` and of the val split. Wall time of the "
        f"whole study: {log.total / 60:.1f} min (the steps' times below, each from the run that produced its "
        f"outputs; this invocation: {(time.perf_counter() - t0) / 60:.1f} min)."
    )
    return write_report(models, stats, rows, inp, log, title=f"pcbkit study: {title}", preamble=preamble,
                        boot={0: boots} if boots else None)
