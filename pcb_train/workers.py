"""Data-loader worker processes: they leave signals to the main process and fail with its message.

    DataLoader(..., worker_init_fn=stop_signals_to_main())
    for batch in unwrap_worker_errors(loader): ...
SIGINT / SIGTERM sent to the whole process group (Ctrl-C, a scheduler's pre-emption) reach the
workers too. torch's workers die of SIGTERM, and the main process then fails with "DataLoader
worker exited unexpectedly" wherever it happens to be. With `stop_signals_to_main()` a worker
ignores SIGINT, and ignores SIGTERM unless the main process sent it: torch's own shutdown
terminates a worker that does not exit in time with SIGTERM, which must still work (an immortal
worker would hang the interpreter's exit). A thread of the worker waits for SIGTERM with
`sigwaitinfo`, which tells the sender; where that is missing (not Linux) workers keep torch's
behaviour. The main process reacts (training saves a stop checkpoint, `pcb_train.stop`) and shuts
its workers down as usual. A `PcbkitError` raised in a worker (a bad image file) reaches the main
process as torch's "Caught PcbkitError in DataLoader worker process N" plus the worker's
traceback; `unwrap_worker_errors` re-raises it with the original one-line message, the same error
as with 0 workers.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TypeVar

from pcb_analysis.errors import PcbkitError

T = TypeVar("T")

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "DataLoader worker process"


def stop_signals_to_main() -> Callable[[int], None]:
    """A `worker_init_fn` that leaves SIGINT / SIGTERM to the calling (main) process."""
    return partial(_leave_stop_signals, os.getpid())


def _leave_stop_signals(main_pid: int, worker_id: int) -> None:
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    senders = {main_pid, os.getppid()}  # the process that owns the loader (and a fork server's child)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_await_sigterm, args=(senders,), name="pcbkit-sigterm", daemon=True).start()


def _await_sigterm(senders: set[int]) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in senders:  # torch's shutdown terminating a worker that did not exit in time
            os._exit(128 + signal.SIGTERM)


def worker_message(err: BaseException) -> str | None:
    """The original message of an error torch re-raised from a loader worker (None: not one)."""
    text = str(err)
    first, _, rest = text.partition("\n")
    if not (first.startswith(_WORKER_PREFIX) and _WORKER_MARK in first):
        return None
    # the traceback's last entry reads "<module>.<qualname>: <message>"
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    at = rest.rfind("\n" + prefix)
    start = at + 1 if at >= 0 else (0 if rest.startswith(prefix) else -1)
    if start < 0:
        return None
    return rest[start + len(prefix):].rstrip("\n")


def unwrap_worker_errors(batches: Iterable[T]) -> Iterator[T]:
    """Iterate `batches`, re-raising a loader worker's `PcbkitError` with its own message."""
    iterator = iter(batches)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except PcbkitError as err:
            message = worker_message(err)
            if message is None:
                raise
            raise type(err)(message) from None
        yield item
