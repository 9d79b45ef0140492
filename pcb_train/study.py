"""The calibration study (paper Table 1 / Table 4) and the demo, as one cached pipeline.

    synth -> train (softmax, PCB) -> dump-logits (train, val; positives only) -> stats
          -> calibrate (none, ms, cm, cm-bayes; val-set and train-set statistics) -> report

Each step records a fingerprint of its inputs next to its outputs (`.step-<name>.json`) and is
skipped on a rerun when the fingerprint is unchanged and its outputs exist; `force` redoes
everything. Training resumes from its last checkpoint and dumps from their last complete shard,
so an interrupted pipeline continues where it stopped. `pcbkit study` runs the same steps for a
given checkpoint on real data (no synth, no training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcb_analysis import learning_curve, plots
from pcb_analysis.atomic import write_json_atomic, write_text_atomic
from pcb_analysis.calibration import ROW_STATISTICS, STATISTICS
from pcb_analysis.errors import PcbkitError
from pcb_analysis.lvis_eval import lvis_equivalent_cap
from pcb_analysis.regime import RegimeDiagnostics, diagnose, stats_from_dump
from pcb_analysis.report import markdown_table, regime_section, rows_to_csv, write_study_report
from pcb_analysis.stats import ClassStats
from pcb_analysis.synth import SynthConfig, generate
from pcb_train.calibrate import RESULTS_PROTOCOL, CalibrateConfig, calibrate_models
from pcb_train.config import load_config, to_dict
from pcb_train.dump_logits import DumpLogitsConfig, dump_logits
from pcb_train.train import train

logger = logging.getLogger(__name__)

STATS = ROW_STATISTICS  # every parameter-free statistic of the table, with val-set statistics
TRAIN_STATS = tuple(s for s in STATS if STATISTICS[s].needs_matrix)  # with train-set statistics too
REPORT_DPI = 120  # committed report figures: readable and small
SOURCES = ("val", "train")


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
        run_step(log, f"{model.name}/dump-{split}", dump_dir.parent, ins, [dump_dir / "manifest.json"],
                 lambda cfg=cfg: _fresh_dump(cfg, dump_logits, inp.force), inp.force)

        def make_stats(dump_dir: Path = dump_dir, stats_path: Path = stats_path, split: str = split,
                       gt: Path = gt) -> None:
            # with the regime diagnostics' sums: gt instances on the dumped images, cm's clipped mass
            stats_from_dump(dump_dir, gt=gt, progress=inp.progress, split=split).save(stats_path)

        run_step(log, f"{model.name}/stats-{split}", stats_path.parent,
                 {**ins, "dump": file_fingerprint(dump_dir / "manifest.json"), "diagnostics": 1},
                 [stats_path], make_stats, inp.force)
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
    has AP at the 300 cap, at the LVIS-equivalent cap round(300 K / 1230) ("AP_cap", with "cap") and
    fixed AP (docs/evaluation.md §4)."""
    k = len(json.loads(Path(inp.val_gt).read_text(encoding="utf-8"))["categories"])
    cap = lvis_equivalent_cap(k)
    cfgs = {
        source: CalibrateConfig(
            stats=stats[source], gt=inp.val_gt, out=inp.work / "results" / model.name / f"{source}-stats",
            stat=STATS if source == "val" else TRAIN_STATS, checkpoint=model.checkpoint, config=model.config,
            images=inp.images, split="val", max_images=inp.val_images, batch_size=inp.batch_size,
            device=inp.device, progress=inp.progress, fixed_ap=inp.fixed_ap, max_dets=cap,
        )
        for source in SOURCES
    }
    ins = {"checkpoint": file_fingerprint(model.checkpoint), "gt": file_fingerprint(inp.val_gt),
           "stats": {s: file_fingerprint(stats[s]) for s in SOURCES},
           "stat": {s: list(c.stat) for s, c in cfgs.items()},
           "cap": inp.val_images, "protocol": RESULTS_PROTOCOL, "fixed_ap": inp.fixed_ap, "max_dets": cap}
    run_step(log, f"{model.name}/calibrate", inp.work / "results" / model.name, ins,
             [c.out / "metrics.json" for c in cfgs.values()], lambda: calibrate_models(list(cfgs.values())),
             inp.force)
    rows: list[dict[str, Any]] = []
    for source, c in cfgs.items():
        report = json.loads((c.out / "metrics.json").read_text())
        for r in report["rows"]:
            m = r["metrics"]
            rows.append({
                "model": model.name,
                "source": "-" if r["family"] == "none" else source,
                "stat": r["family"],
                "AP": m["segm"]["AP"], "APr": m["segm"]["APr"], "APc": m["segm"]["APc"],
                "APf": m["segm"]["APf"],
                "APb": m["bbox"]["AP"], "AP_cap": m.get(f"segm@{cap}", m["segm"]).get("AP"), "cap": cap,
                "classes": k,
                "AP_fixed": m.get("segm_fixed", {}).get("AP"),
            })
    return rows


def regime_diagnostics(
    models: Sequence[StudyModel], stats: Mapping[str, Mapping[str, Path]]
) -> list[RegimeDiagnostics]:
    """`pcb_analysis.regime.diagnose` of every statistics file (val, then train, of each model)."""
    return [diagnose(ClassStats.load(stats[m.name][split]), label=f"{m.name} {split}")
            for m in models for split in ("val", "train") if split in stats[m.name]]


def matrix_notes(models: Sequence[StudyModel], stats: Mapping[str, Mapping[str, Path]]) -> list[str]:
    """What the val-set matrices look like to an inversion (docs/statistics.md §4): mean diagonal per
    r/c/f over the classes with positives (a class without positives has no row and is not counted),
    cond_2 and sigma_min (CM applies M^-1, so a large condition number amplifies noise), the nearest
    rare row and the mass cm's clipping removes."""
    out = []
    for m in models:
        d = diagnose(ClassStats.load(stats[m.name]["val"]))
        per = ", ".join(f"{b.bucket} {_fmt(b.mean_diagonal, '.2f')} ({b.with_rows}/{b.classes} classes)"
                        for b in d.buckets)
        near = "" if d.rare_l1 is None else f"; a rare row lies {d.rare_l1:.3f} (L1) from another row"
        clip = "" if d.clipped_fraction is None else (
            f"; cm's clipping removes {d.clipped_fraction:.2f} of |p M^-1| over the val positives")
        out.append(
            f"**{m.name}**'s val-set matrix: mean diagonal {per} over the classes with positives, "
            f"cond_2(M) {_fmt(d.cond2, '.2g')} (smallest singular value {_fmt(d.sigma_min, '.2g')}){near}"
            f"{clip}. CM applies M^-1: rows whose mass sits on a sibling class rather than the diagonal make "
            "the inverse large, and clipping its negative outputs removes score from the classes they are "
            "confused with."
        )
    return out


def _fmt(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else "inf" if math.isinf(x) else format(x, spec)


def write_report(
    models: Sequence[StudyModel],
    stats: Mapping[str, Mapping[str, Path]],
    rows: list[dict[str, Any]],
    inp: StudyInputs,
    log: StepLog,
    *,
    title: str,
    preamble: str,
    notes: Sequence[str] = (),
    sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Figures (Figure 1 block, overview, diagonal, train-vs-val difference), pairs CSV, tables, README;
    `sections` (heading, markdown) go before the wall times."""
    rep = inp.report
    rep.mkdir(parents=True, exist_ok=True)
    first = models[0].name
    val = ClassStats.load(stats[first]["val"])
    train = ClassStats.load(stats[first]["train"])
    space = val.categories
    if space is None:
        raise PcbkitError(f"{stats[first]['val']}: statistics carry no category space")
    cm_val = val.confusion(warn=False).numpy()
    empty = val.empty_classes().numpy()
    views = {"block": "figure1_block.png", "overview": "overview.png", "diagonal": "diagonal.png",
             "difference": "train_vs_val.png"}
    if not any(space.image_count):
        del views["diagonal"]
    captions = {
        "block": f"Figure 1 analogue: 10-class block of the {first} model's val confusion matrix (log2)",
        "overview": f"Whole-matrix overview ({first}, val)",
        "diagonal": f"Mean score (diagonal) against training images ({first}, val)",
        "difference": f"Train-set minus val-set matrix ({first})",
    }
    cm_train = train.confusion(warn=False).numpy()
    pairs = plots.render_views(
        {v: rep / f for v, f in views.items()}, plots.Matrix(cm_val, empty), space,
        mean_score=val.mean_score(warn=False).numpy(),
        difference=(plots.Matrix(cm_train, label="train"), plots.Matrix(cm_val, label="val")),
        pairs_csv=rep / "top_confused_pairs.csv", n_pairs=50, dpi=REPORT_DPI,
        titles={"block": f"Figure 1 analogue: {first}, val, most-confused 10-class block (log2)",
                "overview": f"{first}: whole val confusion matrix"},
    ).pairs
    assert pairs is not None  # pairs_csv was given
    figs = {captions[v]: f for v, f in views.items()}
    show = pairs.head(10)
    pairs_md = "\n".join(
        ["| true class | predicted as | M[i,j] | M[j,i] | asymmetry |", "|---|---|---|---|---|"]
        + [f"| {r.name_i} ({r.frequency_i}) | {r.name_j} ({r.frequency_j}) | {r.M_ij:.3f} | {r.M_ji:.3f} | "
           f"{r.asymmetry:+.3f} |" for r in show.itertuples()]
    ) + "\n\nAll 50 in `top_confused_pairs.csv`."
    notes = [*matrix_notes(models, stats), *notes]
    write_text_atomic(rep / "results.csv", rows_to_csv(rows))
    write_json_atomic(rep / "results.json", rows, indent=2)
    return write_study_report(
        rep, rows, [m.name for m in models], title=title, preamble=preamble, figures=figs,
        pairs_markdown=pairs_md, notes=notes,
        extra_sections=[
            ("Regime diagnostics of the statistics", regime_section(regime_diagnostics(models, stats))),
            *sections,
            ("Wall time per step", log.markdown()),
        ],
    )


# --------------------------------------------------------------------------------------------
# the demo: the whole pipeline on the embedded synthetic dataset

DEMO_MODELS = (("softmax", "configs/synth_tiny_softmax.yaml"), ("pcb", "configs/synth_tiny_pcb.yaml"))


@dataclass(frozen=True)
class DemoConfig:
    data: Path = Path("data/synth")
    work: Path = Path("runs/demo")
    report: Path = Path("reports/demo")
    configs: Path = Path("configs")
    quick: bool = False
    force: bool = False
    seed: int = 0
    progress: bool = True
    train_dump_images: int = 600


def _synth_config(cfg: DemoConfig) -> Any:
    """Dataset v2 (docs/synth.md): the defaults, i.e. K = 48, 1500 train / 400 val images of 128 px,
    random negative sets; the quick demo's K = 12 version is small enough for CI."""
    if cfg.quick:
        return SynthConfig(seed=cfg.seed, num_classes=12, train_images=240, val_images=60, size=64)
    return SynthConfig(seed=cfg.seed)


def _train_overrides(cfg: DemoConfig, num_classes: int) -> list[str]:
    d = cfg.data
    ov = [
        f"data.train_ann={d / 'train.json'}", f"data.train_images={d / 'images'}",
        f"data.val_ann={d / 'val.json'}", f"data.val_images={d / 'images'}",
        f"model.num_classes={num_classes}", f"seed={cfg.seed}",
    ]
    if cfg.quick:  # a few iterations: exercises every step (one mid-run evaluation too), learns little
        ov += ["solver.max_iter=24", "solver.lr_steps=[16,22]", "solver.warmup_iters=4",
               "solver.ims_per_batch=4", "eval_period=12"]
    return ov


def run_demo(cfg: DemoConfig) -> Path:
    """The main job: every step of the study on the synthetic dataset; returns the report path."""
    log = StepLog()
    t0 = time.perf_counter()
    scfg = _synth_config(cfg)
    run_step(log, "synth", cfg.data, {"synth": repr(scfg)}, [cfg.data / "train.json", cfg.data / "val.json"],
             lambda: generate(cfg.data, scfg, progress=cfg.progress), cfg.force)
    models: list[StudyModel] = []
    for name, config_path in DEMO_MODELS:
        tcfg = load_config(cfg.configs / Path(config_path).name,
                           overrides=_train_overrides(cfg, scfg.num_classes))
        max_iter = int(tcfg.solver.max_iter or 0)  # both demo models share the solver (learning curve)
        run_dir = cfg.work / "runs" / name
        ins = {"config": to_dict(tcfg), "data": file_fingerprint(cfg.data / "train.json")}
        marker = run_dir / f".step-train-{name}.json"
        changed = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != hashlib.sha256(
            json.dumps({**ins}, sort_keys=True, default=str).encode()).hexdigest()

        def do_train(tcfg: Any = tcfg, run_dir: Path = run_dir, changed: bool = changed) -> None:
            fresh = cfg.force or changed
            # the calibrate step evaluates (the `none` row is the plain model), so no final evaluation here
            train(tcfg, run_dir, resume=not fresh, force=fresh, progress=cfg.progress, evaluate_at_end=False)

        run_step(log, f"train-{name}", run_dir, ins, [run_dir / "model_final.pth"], do_train, cfg.force)
        models.append(StudyModel(name=name, config=run_dir / "config.yaml",
                                 checkpoint=run_dir / "model_final.pth"))
    inp = StudyInputs(
        train_gt=cfg.data / "train.json", val_gt=cfg.data / "val.json", images=cfg.data / "images",
        work=cfg.work, report=cfg.report, train_dump_images=None if cfg.quick else cfg.train_dump_images,
        progress=cfg.progress, force=cfg.force,
    )
    stats = {m.name: dump_and_stats(m, inp, log) for m in models}
    rows = [row for m in models for row in calibrate_all(m, stats[m.name], inp, log)]
    elapsed = time.perf_counter() - t0
    preamble = (
        f"Produced by `pcbkit demo{' --quick' if cfg.quick else ''}` on the embedded **synthetic** "
        f"long-tailed dataset (`pcbkit synth`, seed {cfg.seed}: {scfg.num_classes} classes, "
        f"{scfg.train_images} train / {scfg.val_images} val images of {scfg.size} px), with two tiny Mask "
        "R-CNNs trained on a **2-core CPU**: `softmax` (cross-entropy, random sampler) and `pcb` (online "
        "confusion matrix, fightback loss, 3-step iterative RoI head). The statistics come from positive "
        "proposals (IoU >= 0.5) dumped on train "
        f"({'all' if inp.train_dump_images is None else inp.train_dump_images} images) and val. The numbers "
        "are not comparable with the paper's LVIS numbers; they show the method's mechanics end to end. The "
        f"whole pipeline takes {log.total / 60:.1f} min of wall time on this machine (the steps' times "
        f"below, each from the run that produced its outputs; this invocation: {elapsed / 60:.1f} min)."
    )
    notes = [
        "The pcb model's iterative head starts with g = 1, c = 0 (`model.modulation_init: identity`, a "
        "pcbkit option; the official code's default initialisation scales the RoI features down at the "
        "start, which a tiny detector trained from scratch for a few hundred iterations does not recover "
        "from). See `configs/synth_tiny_pcb.yaml`.",
        "Synthetic data, tiny models and a few minutes of CPU training: absolute APs are far from LVIS "
        "numbers, and one seed gives no error bars; read differences of a point or two as noise.",
        "The paper's Table 1 is an upper bound: the statistics are measured on the same val split that is "
        "evaluated. The Table 4 rows use the train split's statistics instead.",
    ]
    curve = learning_curve.demo_section(
        {m.name: cfg.work / "runs" / m.name for m in models}, rows, max_iter,
        cfg.report / "learning_curve.png", dpi=REPORT_DPI)
    return write_report(models, stats, rows, inp, log,
                        title="pcbkit demo: calibration study on synthetic data",
                        preamble=preamble, notes=notes, sections=[("Learning curves (val)", curve)])


def run_study(
    name: str, config: Path, checkpoint: Path, inp: StudyInputs
) -> Path:
    """The study for an existing checkpoint on real data (e.g. LVIS v0.5/v1): no synth, no training."""
    for p, what in ((config, "config"), (checkpoint, "checkpoint"), (inp.train_gt, "train ground truth"),
                    (inp.val_gt, "val ground truth"), (inp.images, "image directory")):
        if not Path(p).exists():
            raise PcbkitError(f"{p}: {what} not found")
    log = StepLog()
    t0 = time.perf_counter()
    model = StudyModel(name=name, config=config, checkpoint=checkpoint)
    stats = {name: dump_and_stats(model, inp, log)}
    rows = calibrate_all(model, stats[name], inp, log)
    preamble = (
        f"Produced by `pcbkit study` for checkpoint `{checkpoint}` (config `{config}`) on `{inp.val_gt}`, "
        f"with statistics from positive proposals of `{inp.train_gt}` and of the val split. Wall time of the "
        f"whole study: {log.total / 60:.1f} min (the steps' times below, each from the run that produced its "
        f"outputs; this invocation: {(time.perf_counter() - t0) / 60:.1f} min)."
    )
    return write_report([model], stats, rows, inp, log, title=f"pcbkit study: {name}", preamble=preamble)
