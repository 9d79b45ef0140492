"""`pcbkit demo`: the whole calibration study on the embedded synthetic dataset, over training seeds.

    synth (one dataset, seed `seed`) -> for each training seed seed, seed + 1, ..., seed + seeds - 1:
        train (models; default softmax, PCB) -> dump-logits -> stats -> calibrate -> bootstrap   -> one report

The training seed (model initialisation, sampler order, augmentation stream) is what varies; the
dataset is the same for every seed. The first seed works in `work` itself (today's paths, so its
caches stay valid), seed s > first in `work/seed-<s>`; every step is cached and resumable as in
`pcb_train.study`. The report shows mean ± std over the seeds, paired bootstrap intervals and the
reading's rule (`pcb_analysis.reading`); `results.csv` has the per-seed values.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcb_analysis import learning_curve
from pcb_analysis.errors import PcbkitError
from pcb_analysis.synth import SynthConfig, generate
from pcb_train.config import load_config, to_dict
from pcb_train.study import (
    StepLog,
    StudyInputs,
    StudyModel,
    bootstrap_model,
    calibrate_all,
    dump_and_stats,
    file_fingerprint,
    run_step,
)
from pcb_train.study_bootstrap import DEFAULT_RESAMPLES
from pcb_train.study_report import REPORT_DPI, write_report
from pcb_train.train import train

DEMO_MODELS = (("softmax", "configs/synth_tiny_softmax.yaml"), ("pcb", "configs/synth_tiny_pcb.yaml"))
DEFAULT_MODEL_NAMES = tuple(name for name, _ in DEMO_MODELS)


def parse_models(spec: str, configs: Path = Path("configs")) -> tuple[tuple[str, str], ...]:
    """`--models softmax,pcb,seesaw,seesaw_pcb` -> ((name, configs/synth_tiny_<name>.yaml), ...).

    The first model is the reference of the report's comparisons. One-line PcbkitError for an empty
    list, a repeated name, a name that is not a plain word, or a name without its config file."""
    names = [n.strip() for n in spec.split(",")]
    if not spec.strip() or any(not n for n in names):
        raise PcbkitError(f"--models {spec!r}: expected comma-separated model names, e.g. softmax,pcb")
    out: list[tuple[str, str]] = []
    for name in names:
        if not name.replace("_", "").isalnum():
            raise PcbkitError(f"--models: model name {name!r} must be letters, digits and '_'")
        if name in (n for n, _ in out):
            raise PcbkitError(f"--models: model {name!r} is listed twice")
        config = configs / f"synth_tiny_{name}.yaml"
        if not config.is_file():
            known = sorted(f.stem.removeprefix("synth_tiny_") for f in configs.glob("synth_tiny_*.yaml"))
            raise PcbkitError(f"--models: unknown model {name!r} ({config} not found; "
                              f"known: {', '.join(known)})")
        out.append((name, str(config)))
    return tuple(out)


@dataclass(frozen=True)
class DemoConfig:
    data: Path = Path("data/synth")
    work: Path = Path("runs/demo")
    report: Path = Path("reports/demo")
    configs: Path = Path("configs")
    quick: bool = False
    force: bool = False
    seed: int = 0  # the dataset's seed and the first training seed
    progress: bool = True
    train_dump_images: int = 600
    seeds: int = 1  # training seeds per model
    bootstrap: int = DEFAULT_RESAMPLES  # image resamples of the paired intervals; 0: none
    models: tuple[tuple[str, str], ...] = DEMO_MODELS  # (name, config); the first is the reference


def training_seeds(cfg: DemoConfig) -> list[int]:
    """seed, seed + 1, ..., seed + seeds - 1."""
    if cfg.seeds < 1:
        raise PcbkitError(f"--seeds {cfg.seeds}: must be at least 1")
    return [cfg.seed + i for i in range(cfg.seeds)]


def seed_work(cfg: DemoConfig, seed: int) -> Path:
    """The work folder of a training seed: `work` for the first (today's paths), else work/seed-<s>."""
    return cfg.work if seed == cfg.seed else cfg.work / f"seed-{seed}"


def _synth_config(cfg: DemoConfig) -> Any:
    """Dataset v2 (docs/synth.md): the defaults, i.e. K = 48, 1500 train / 400 val images of 128 px,
    random negative sets; the quick demo's K = 12 version is small enough for CI."""
    if cfg.quick:
        return SynthConfig(seed=cfg.seed, num_classes=12, train_images=240, val_images=60, size=64)
    return SynthConfig(seed=cfg.seed)


def _train_overrides(cfg: DemoConfig, num_classes: int, seed: int | None = None) -> list[str]:
    d = cfg.data
    ov = [
        f"data.train_ann={d / 'train.json'}", f"data.train_images={d / 'images'}",
        f"data.val_ann={d / 'val.json'}", f"data.val_images={d / 'images'}",
        f"model.num_classes={num_classes}", f"seed={cfg.seed if seed is None else seed}",
    ]
    if cfg.quick:  # a few iterations: exercises every step (one mid-run evaluation too), learns little
        ov += ["solver.max_iter=24", "solver.lr_steps=[16,22]", "solver.warmup_iters=4",
               "solver.ims_per_batch=4", "eval_period=12"]
    return ov


def train_models(cfg: DemoConfig, scfg: Any, seed: int, log: StepLog) -> tuple[list[StudyModel], int]:
    """Train (cached) the demo's models with training seed `seed`; returns them and max_iter."""
    work, prefix = seed_work(cfg, seed), ("" if seed == cfg.seed else f"seed{seed}/")
    models: list[StudyModel] = []
    max_iter = 0
    for name, config_path in cfg.models:
        tcfg = load_config(cfg.configs / Path(config_path).name,
                           overrides=_train_overrides(cfg, scfg.num_classes, seed))
        max_iter = int(tcfg.solver.max_iter or 0)  # the demo models share the solver (learning curve)
        run_dir = work / "runs" / name
        ins = {"config": to_dict(tcfg), "data": file_fingerprint(cfg.data / "train.json")}
        step = f"{prefix}train-{name}"
        marker = run_dir / f".step-{step.replace('/', '_')}.json"
        changed = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != hashlib.sha256(
            json.dumps({**ins}, sort_keys=True, default=str).encode()).hexdigest()

        def do_train(tcfg: Any = tcfg, run_dir: Path = run_dir, changed: bool = changed) -> None:
            fresh = cfg.force or changed
            # the calibrate step evaluates (the `none` row is the plain model), so no final evaluation here
            train(tcfg, run_dir, resume=not fresh, force=fresh, progress=cfg.progress, evaluate_at_end=False)

        run_step(log, step, run_dir, ins, [run_dir / "model_final.pth"], do_train, cfg.force)
        models.append(StudyModel(name=name, config=run_dir / "config.yaml",
                                 checkpoint=run_dir / "model_final.pth"))
    return models, max_iter


def run_demo(cfg: DemoConfig) -> Path:
    """The main job: every step of the study on the synthetic dataset; returns the report path."""
    log = StepLog()
    t0 = time.perf_counter()
    seeds = training_seeds(cfg)
    scfg = _synth_config(cfg)
    run_step(log, "synth", cfg.data, {"synth": repr(scfg)}, [cfg.data / "train.json", cfg.data / "val.json"],
             lambda: generate(cfg.data, scfg, progress=cfg.progress), cfg.force)
    rows: list[dict[str, Any]] = []
    seed_stats: dict[int, dict[str, dict[str, Path]]] = {}
    boot: dict[int, list[Path]] = {}
    first: tuple[list[StudyModel], StudyInputs] | None = None
    max_iter = 0
    for seed in seeds:
        models, max_iter = train_models(cfg, scfg, seed, log)
        inp = StudyInputs(
            train_gt=cfg.data / "train.json", val_gt=cfg.data / "val.json", images=cfg.data / "images",
            work=seed_work(cfg, seed), report=cfg.report,
            train_dump_images=None if cfg.quick else cfg.train_dump_images, progress=cfg.progress,
            force=cfg.force, bootstrap=cfg.bootstrap, step_prefix="" if seed == cfg.seed else f"seed{seed}/",
        )
        first = first or (models, inp)
        seed_stats[seed] = {m.name: dump_and_stats(m, inp, log) for m in models}
        for m in models:
            mine = [{**r, "seed": seed} for r in calibrate_all(m, seed_stats[seed][m.name], inp, log)]
            rows += mine
            path = bootstrap_model(m, mine, inp, log)
            if path is not None:
                boot.setdefault(seed, []).append(path)
    assert first is not None  # training_seeds gives at least one seed
    models, inp = first
    elapsed = time.perf_counter() - t0
    seed_text = (f"training seed {seeds[0]}" if len(seeds) == 1
                 else f"{len(seeds)} training seeds ({', '.join(map(str, seeds))}) per model")
    names = [name for name, _ in cfg.models]
    default = tuple(names) == DEFAULT_MODEL_NAMES
    model_text = (f"two tiny Mask R-CNNs trained on a **2-core CPU**, {seed_text}: `softmax` "
                  "(cross-entropy, random sampler) and `pcb` (online confusion matrix, fightback loss, "
                  "3-step iterative RoI head)") if default else (
        f"{len(names)} tiny Mask R-CNNs trained on a **2-core CPU**, {seed_text}: "
        + ", ".join(f"`{n}` (`{c}`)" for n, c in cfg.models)
        + f"; the loss families are described in docs/losses.md; `{names[0]}` is the reference of the "
        "comparisons")
    preamble = (
        f"Produced by `pcbkit demo{' --quick' if cfg.quick else ''}"
        f"{f' --seeds {len(seeds)}' if len(seeds) > 1 else ''}"
        f"{'' if default else ' --models ' + ','.join(names)}` on the embedded **synthetic** "
        f"long-tailed dataset (`pcbkit synth`, seed {cfg.seed}: {scfg.num_classes} classes, "
        f"{scfg.train_images} train / {scfg.val_images} val images of {scfg.size} px; one dataset for every "
        f"seed), with {model_text}. The statistics come from positive "
        "proposals (IoU >= 0.5) dumped on train "
        f"({'all' if inp.train_dump_images is None else inp.train_dump_images} images) and val. The numbers "
        "are not comparable with the paper's LVIS numbers; they show the method's mechanics end to end. The "
        f"whole pipeline takes {log.total / 60:.1f} min of wall time on this machine (the steps' times "
        f"below, each from the run that produced its outputs; this invocation: {elapsed / 60:.1f} min)."
    )
    pcb_note = [
        "The pcb model's iterative head starts with g = 1, c = 0 (`model.modulation_init: identity`, a "
        "pcbkit option; the official code's default initialisation scales the RoI features down at the "
        "start, which a tiny detector trained from scratch for a few hundred iterations does not recover "
        "from). See `configs/synth_tiny_pcb.yaml`."] if "pcb" in names else []
    notes = [
        *pcb_note,
        "Synthetic data, tiny models and a few minutes of CPU training: absolute APs are far from LVIS "
        "numbers; only differences the reading calls an effect are more than noise (see \"Differences "
        "with 95% intervals\").",
        "The paper's Table 1 is an upper bound: the statistics are measured on the same val split that is "
        "evaluated. The Table 4 rows use the train split's statistics instead.",
    ]
    first_rows = [r for r in rows if r["seed"] == seeds[0]]
    curve = learning_curve.demo_section(
        {m.name: seed_work(cfg, seeds[0]) / "runs" / m.name for m in models}, first_rows, max_iter,
        cfg.report / "learning_curve.png", dpi=REPORT_DPI)
    if len(seeds) > 1:
        curve += f"\n\nCurves of the first training seed ({seeds[0]})."
    return write_report(models, seed_stats[seeds[0]], rows, inp, log,
                        title="pcbkit demo: calibration study on synthetic data",
                        preamble=preamble, notes=notes, sections=[("Learning curves (val)", curve)],
                        boot=boot or None, seed_stats=seed_stats, demo=True)
