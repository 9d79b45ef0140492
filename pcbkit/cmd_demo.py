"""`pcbkit demo`: the whole study on the embedded synthetic dataset (the main job)."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--quick", is_flag=True, help="A reduced run (small dataset, a few iterations): every step, minutes.")
@click.option("--force", is_flag=True, help="Redo every step, even those whose inputs have not changed.")
@click.option("--data", type=click.Path(file_okay=False), default=None, help="Dataset dir [data/synth or data/synth-quick].")
@click.option("--work", type=click.Path(file_okay=False), default=None, help="Runs, dumps, stats, results [runs/demo(-quick)].")
@click.option("--report", type=click.Path(file_okay=False), default=None, help="Report dir [reports/demo(-quick)].")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_cmd(quick: bool, force: bool, data: str | None, work: str | None, report: str | None, seed: int) -> None:
    """Run the demo: synth, train softmax + PCB, dump, stats, calibrate, report."""
    import time
    from pathlib import Path

    from pcb_train.study import DemoConfig, run_demo

    suffix = "-quick" if quick else ""
    cfg = DemoConfig(
        data=Path(data or f"data/synth{suffix}"),
        work=Path(work or f"runs/demo{suffix}"),
        report=Path(report or f"reports/demo{suffix}"),
        quick=quick,
        force=force,
        seed=seed,
    )
    t0 = time.perf_counter()
    path = run_demo(cfg)
    click.echo(f"demo done in {(time.perf_counter() - t0) / 60:.1f} min; report: {path}")
