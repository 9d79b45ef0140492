"""One writer per output folder: a lock file, and the clean-up of the folder's stale temporaries.

    with folder_lock(out, "train"):      # PcbkitError when a live process holds `out`
        remove_stale_temporaries(out, ("last_checkpoint.pth", ...))
        ...                              # write into `out`
The lock is `<folder>/.pcbkit.lock` (or `.pcbkit-rNN.lock`, one per rank of a multi-process
writer), a JSON object {pid, host, started (UTC, ISO 8601), command}, created atomically with
O_CREAT | O_EXCL and removed when the block ends (also on an exception). A lock whose process is
gone (same host, pid not alive, or alive but started after the lock: a reused pid) is stale: it
is taken over with a warning. A lock of another host cannot be checked and is refused; the
message says which file to delete once that run is known to be gone. Holding the lock is what
makes removing temporaries safe: nobody else writes into the folder. Details: docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path

from pcb_analysis.errors import PcbkitError, input_error

logger = logging.getLogger(__name__)

LOCK_NAME = ".pcbkit.lock"
# What `pcb_analysis.atomic.atomic_path` leaves when its process dies: `.<target>.<mkstemp's 8
# random characters><suffix>`, where the suffix is `<target's extension>.tmp` (or the writer's own).
# Hidden `<name>.partial` files are what earlier pcbkit versions left.
_TEMPORARY_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)*\.(?:tmp|partial)$")
_PARTIAL_RE = re.compile(r"^\.(?P<target>.+)\.partial$")
_UNREADABLE_GRACE_S = 2.0  # a lock file another process has just created but not yet filled


@dataclass(frozen=True)
class LockInfo:
    """Who holds a folder: process id, host name, start time (ISO 8601, UTC) and command."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.started}, {self.command})"


def lock_name(rank: int | None = None) -> str:
    """The lock file of a folder (`rank`: one lock per rank of a multi-process writer)."""
    return LOCK_NAME if rank is None else f".pcbkit-r{rank:02d}.lock"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read(path: Path) -> LockInfo | None:
    """The lock's holder, or None when the file is gone, empty or not a lock."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockInfo(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _process_start(pid: int) -> float | None:
    """The start time (epoch seconds) of a live process, from /proc (None where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def is_stale(info: LockInfo) -> bool:
    """True when the holder is a process of this host that no longer runs (a reused pid counts)."""
    if info.host != socket.gethostname():
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    start = _process_start(info.pid)
    try:
        locked = datetime.fromisoformat(info.started).timestamp()
    except ValueError:
        return False
    return start is not None and start > locked + 2.0  # the pid now names a newer process


def _create(path: Path, info: LockInfo) -> bool:
    """Create the lock file holding `info`; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"pid": info.pid, "host": info.host, "started": info.started, "command": info.command}, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(folder: Path, command: str, rank: int | None = None) -> LockInfo:
    """Take the lock of `folder` (created when missing) or raise PcbkitError naming its holder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise input_error(folder, f"cannot create the output folder ({err.strerror})") from err
    path = folder / lock_name(rank)
    me = LockInfo(os.getpid(), socket.gethostname(), _now(), command)
    first_unreadable: float | None = None
    while True:
        try:
            if _create(path, me):
                return me
        except OSError as err:
            raise input_error(path, f"cannot create the lock file ({err.strerror})") from err
        holder = _read(path)
        if holder is None:  # being written right now, or left empty by a crash during its creation
            first_unreadable = first_unreadable if first_unreadable is not None else time.monotonic()
            if time.monotonic() - first_unreadable < _UNREADABLE_GRACE_S:
                time.sleep(0.05)
                continue
            logger.warning("%s: removing an unreadable lock file", path)
            path.unlink(missing_ok=True)
            continue
        if not is_stale(holder):
            where = "" if holder.host == me.host else f"; if that run is gone, delete {path}"
            raise PcbkitError(f"{folder} is in use by {holder.describe()}{where}")
        # take the stale lock over: move it aside (only one process can), check that what moved is
        # the lock just judged stale (not a fresh one that replaced it meanwhile), then retry
        aside = path.with_name(f"{path.name}.stale-{me.pid}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            continue
        moved = _read(aside)
        if moved != holder:
            os.replace(aside, path)  # someone else's fresh lock: put it back and look again
            continue
        aside.unlink(missing_ok=True)
        logger.warning("%s: taking over the stale lock of %s", folder, holder.describe())


def release(folder: Path, info: LockInfo, rank: int | None = None) -> None:
    """Remove the lock of `folder` if it is still `info`'s."""
    path = folder / lock_name(rank)
    if _read(path) == info:
        path.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: str | Path, command: str, rank: int | None = None) -> Iterator[LockInfo]:
    """Hold the lock of `folder` for the block (see the module docstring). A folder the block
    created and left empty (a run that failed before writing) is removed with the lock."""
    folder = Path(folder)
    existed = folder.exists()
    info = acquire(folder, command, rank)
    try:
        yield info
    finally:
        release(folder, info, rank)
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def temporary_target(name: str) -> str | None:
    """The file a stale temporary `name` was meant to become (None: not a temporary)."""
    m = _TEMPORARY_RE.match(name) or _PARTIAL_RE.match(name)
    return m.group("target") if m else None


def remove_stale_temporaries(folder: str | Path, targets: Iterable[str]) -> list[Path]:
    """Delete the temporaries in `folder` (not below it) that atomic writes of files matching one of
    the glob patterns `targets` left behind; the caller must hold the folder's lock. Returns them."""
    folder = Path(folder)
    patterns = tuple(targets)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        target = temporary_target(entry.name)
        if target is None or not any(fnmatchcase(target, p) for p in patterns) or not entry.is_file():
            continue
        size = entry.stat().st_size
        entry.unlink(missing_ok=True)
        removed.append(entry)
        logger.info("%s: removed a stale temporary file of %s (%s bytes)", entry, target, f"{size:,}")
    return removed
