"""`pcbkit train`: train Mask R-CNN (softmax / RFS / PCB / iterative head) from a YAML config.

Only click is imported at module level; torch and the training loop load inside the command.
Multi-GPU / multi-node: launch the same command line with `torchrun --nproc_per_node=N`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click


@click.command("train", short_help="Train Mask R-CNN with the PCB loss / iterative head from a YAML config.")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML training config (configs/synth_tiny_pcb.yaml, configs/lvis_v1_r50_fpn_pcb_2x.yaml, ...).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (default: runs/<name from the config>).",
)
@click.option("--resume", is_flag=True, help="Continue the run in the folder from its last_checkpoint.pth.")
@click.option(
    "--force", is_flag=True, help="Start over in a folder that already holds a run (deletes its outputs)."
)
@click.option("--no-eval", is_flag=True, help="Skip the final evaluation on the validation split.")
@click.option("--no-progress", is_flag=True, help="No progress bar (the periodic log lines stay).")
@click.argument("overrides", nargs=-1)
def train_cmd(
    config_path: Path,
    out_dir: Path | None,
    resume: bool,
    force: bool,
    no_eval: bool,
    no_progress: bool,
    overrides: tuple[str, ...],
) -> None:
    """Train the detector of CONFIG; OVERRIDES are dotted key=value pairs (solver.max_iter=100).

    Writes config.yaml, last_checkpoint.pth, model_final.pth, metrics.jsonl, final_metrics.json
    and TensorBoard events to the run folder (locked while the run goes on). Ctrl-C or SIGTERM saves
    a checkpoint; --resume continues exactly.
    """
    # lazy: pcb_train imports torch, which `pcbkit --help` must not pay for
    from pcb_train.config import load_config
    from pcb_train.stop import Stopped
    from pcb_train.train import train

    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: only rank 0 talks
        logging.getLogger().setLevel(logging.WARNING)
    cfg = load_config(config_path, overrides)
    try:
        result = train(
            cfg, out_dir, resume=resume, force=force, evaluate_at_end=not no_eval, progress=not no_progress
        )
    except Stopped as stop:  # SIGINT / SIGTERM: the checkpoint is saved; one line, 128 + signal number
        click.echo(f"pcbkit: {stop}", err=True)
        sys.exit(stop.exit_code)
    if int(os.environ.get("RANK", "0")) > 0:
        return
    spi = (
        f"{result.seconds_per_iter:.3f} s/it"
        if result.seconds_per_iter is not None
        else "nothing left to train"
    )
    click.echo(
        f"trained {cfg.name}: {result.iterations}/{result.max_iter} iterations ({spi}) -> {result.out_dir}"
    )
    m = result.metrics
    if m:
        parts = [f"{k} {100 * m[k]:.1f}" for k in ("AP", "APr", "APc", "APf", "APb") if m.get(k) is not None]
        click.echo("  val: " + "  ".join(parts))
