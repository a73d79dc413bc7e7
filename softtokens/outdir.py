"""Output folders of train, eval and ood: created with clear errors, and held by one run at a time.

The lock is an ``fcntl`` lock on ``<folder>/.lock``. The kernel releases it when
the holder dies, however it dies, so a kill -9 never leaves a stale lock; the
file keeps the holder's PID for the message a second run gets.
"""

from __future__ import annotations

import os
from pathlib import Path

from softtokens.errors import UsageError

LOCK = ".lock"


def prepare(path: str | Path, what: str) -> Path:
    """Create the folder (and its parents) or say in one line why it cannot be used."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder: choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise UsageError(f"{what} {path} is not writable: check its permissions or choose another path") from None
    except NotADirectoryError:
        raise UsageError(f"{what} {path}: a parent of it is a file, not a folder") from None
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be written ({e.strerror})") from None
    return path


def check_usable(path: str | Path, what: str) -> None:
    """What ``prepare`` checks, creating nothing (a dry run): the folder, or the nearest one above it that
    exists, is a folder this process can write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder: choose another path")
    above = path
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"{what} {path}: a parent of it is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not writable: check its permissions or choose another path")


def differences(saved: dict, now: dict, keys) -> list[str]:
    """'name: old -> new' for each of ``keys`` that differs (a key the saved run lacks is not compared): how
    train, eval and ood all say what a resume may not change."""
    return [f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in keys if k in saved and saved[k] != now.get(k)]


def refuse_to_overwrite(path: Path, what: str, flag: str) -> None:
    """A folder that already holds a run's work continues only with --resume."""
    raise UsageError(f"{path} already holds {what}: pass --resume to continue, or choose another {flag}")


class FolderLock:
    """An exclusive lock on an output folder for the life of a run (a context manager)."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what, self._fd = Path(path), what, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"{self.what} {self.path} is in use by another run (PID {holder}): wait for it, "
                             "stop it, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (removing it would race a waiter)
            self._fd = None
