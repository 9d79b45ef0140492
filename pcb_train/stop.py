"""Graceful stop of the training loop on SIGINT / SIGTERM.

`with StopRequest() as stop:` installs handlers (main thread only) for the duration of the loop:
the first signal sets `stop.requested`, and the loop saves a checkpoint after the current
iteration (Ctrl-C, a scheduler's pre-emption, torchrun passing on a Ctrl-C); a second signal
restores the previous handlers and raises KeyboardInterrupt at once. SIGTERM (what schedulers
such as SLURM send before killing a job) is handled exactly like SIGINT. Data-loader workers
ignore both unless the main process sends them (`pcb_train.workers`; forked ones that have not yet got there
inherit this handler, which ignores them too): the main process decides. After the stop checkpoint
the trainer raises `Stopped`, a KeyboardInterrupt whose message is the one line to print.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import AbstractContextManager
from typing import Any

logger = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its checkpoint; str() is the one-line message and
    `exit_code` the shell's convention (128 + the signal number)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class StopRequest(AbstractContextManager["StopRequest"]):
    """SIGINT / SIGTERM handler for the loop: one signal asks it to stop, a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked to stop
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: the main process decides
            return
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        logger.warning(
            "%s: saving a checkpoint after this iteration (again to abort at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self.restore()
