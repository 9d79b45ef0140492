"""`pcbkit demo`: parse the options, run `pcb_train.study_demo.run_demo` (the main job), print the report."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pcb_analysis.paths import check_output_path

FOLDER = click.Path(file_okay=False)


@click.command("demo")
@click.option("--quick", is_flag=True,
              help="A reduced run (small dataset, a few iterations): every step, minutes.")
@click.option("--force", is_flag=True, help="Redo every step, even those whose inputs have not changed.")
@click.option("--data", type=FOLDER, default=None, help="Dataset dir [data/synth or data/synth-quick].")
@click.option("--work", type=FOLDER, default=None, help="Runs, dumps, stats, results [runs/demo(-quick)].")
@click.option("--report", type=FOLDER, default=None, help="Report dir [reports/demo(-quick)].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the synthetic dataset and the first training seed.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training seeds per model (seed, seed+1, ...; one dataset); the report gives mean ± std.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="Image resamples of the paired bootstrap intervals (0: none).")
@click.option("--models", default="softmax,pcb", show_default=True,
              help="Comma-separated models, each configs/synth_tiny_<name>.yaml (e.g. softmax,pcb,seesaw,"
                   "seesaw_pcb; docs/losses.md); the first is the reference of the comparisons.")
def demo_cmd(
    quick: bool, force: bool, data: str | None, work: str | None, report: str | None, seed: int, seeds: int,
    bootstrap: int, models: str,
) -> None:
    """Run the demo: synth, train the models (softmax + PCB by default), dump, stats, calibrate, report."""
    # lazy: the library imports torch, which `pcbkit --help` must not pay for
    from pcb_train.study_demo import DemoConfig, parse_models, run_demo

    for path, option in ((data, "--data"), (work, "--work"), (report, "--report")):
        if path is not None:
            check_output_path(path, option, folder=True)
    suffix = "-quick" if quick else ""
    cfg = DemoConfig(
        data=Path(data or f"data/synth{suffix}"),
        work=Path(work or f"runs/demo{suffix}"),
        report=Path(report or f"reports/demo{suffix}"),
        quick=quick,
        force=force,
        seed=seed,
        seeds=seeds,
        bootstrap=bootstrap,
        models=parse_models(models),
    )
    t0 = time.perf_counter()
    path = run_demo(cfg)
    click.echo(f"demo done in {(time.perf_counter() - t0) / 60:.1f} min; report: {path}")
