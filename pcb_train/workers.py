"""Data-loader worker processes: they leave signals to the main process and fail with its message.

    DataLoader(..., worker_init_fn=ignore_stop_signals)
    for batch in unwrap_worker_errors(loader): ...
SIGINT / SIGTERM sent to the whole process group (Ctrl-C, a scheduler's pre-emption) reach the
workers too. torch's workers die of SIGTERM, and the main process then fails with "DataLoader
worker exited unexpectedly" wherever it happens to be; `ignore_stop_signals` makes workers ignore
both signals, so only the main process reacts (training saves a stop checkpoint, see
`pcb_train.stop`) and shuts its workers down as usual. A `PcbkitError` raised in a worker (a bad
image file) reaches the main process as torch's "Caught PcbkitError in DataLoader worker process
N" plus the worker's traceback; `unwrap_worker_errors` re-raises it with the original one-line
message, the same error as with 0 workers.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from typing import TypeVar

from pcb_analysis.errors import PcbkitError

T = TypeVar("T")

_WORKER_PREFIX = "Caught "
_WORKER_MARK = "DataLoader worker process"


def ignore_stop_signals(worker_id: int) -> None:
    """`worker_init_fn`: the worker ignores SIGINT and SIGTERM (the main process decides)."""
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
