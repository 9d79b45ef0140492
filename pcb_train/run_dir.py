"""The run folder of `pcbkit train` (default runs/<name>): its file names and their life cycle.

    config.yaml          the resolved config
    last_checkpoint.pth  model + training state (`pcb_train.train_state`), for --resume
    model_final.pth      the trained model (+ PCB buffers), loadable by every pcbkit command
    metrics.jsonl        train / eval records (`pcb_train.run_log`)
    final_metrics.json   the final LVIS evaluation
    events.out.tfevents.*  TensorBoard scalars (when `tensorboard` is installed)
Rank 0 writes every file, each atomically, while it holds the folder's lock (`.pcbkit.lock`,
`pcb_analysis.folder_lock`): a second run on the same folder is refused, and the run removes the
temporaries its killed predecessors left (`.last_checkpoint.pth.*.tmp`, ...). A new run (or
--force) deletes these files only, never anything else in the folder; a resumed run cuts
metrics.jsonl back to its checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from pcb_train.config import TrainConfig, save_config
from pcb_train.run_log import EVENTS_PREFIX, METRICS_FILE, truncate_metrics

CONFIG_FILE = "config.yaml"
LAST_CHECKPOINT = "last_checkpoint.pth"
FINAL_MODEL = "model_final.pth"
FINAL_METRICS = "final_metrics.json"
RUN_FILES = (CONFIG_FILE, LAST_CHECKPOINT, FINAL_MODEL, METRICS_FILE, FINAL_METRICS)
TEMPORARY_TARGETS = RUN_FILES
"""The files whose stale atomic-write temporaries a run removes from its folder once it holds the lock."""


def existing_outputs(out: Path) -> list[str]:
    """The run files already in `out` (events files as one 'events.out.tfevents.*' entry)."""
    names = [n for n in RUN_FILES if (out / n).exists()]
    if out.is_dir() and any(p.name.startswith(EVENTS_PREFIX) for p in out.iterdir()):
        names.append(EVENTS_PREFIX + "*")
    return names


def clear_outputs(out: Path) -> None:
    """Delete the run files of `out` (and nothing else)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for p in out.glob(EVENTS_PREFIX + "*"):
        p.unlink()


def prepare_run_dir(out: Path, cfg: TrainConfig, resume_from: int | None) -> None:
    """Create `out` for a new run (clearing old run files) or a resumed one (cutting metrics.jsonl
    back to iteration `resume_from`), and write the config."""
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        clear_outputs(out)
    else:
        truncate_metrics(out / METRICS_FILE, resume_from)
    save_config(cfg, out / CONFIG_FILE)
