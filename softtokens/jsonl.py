"""Append-only JSONL files that a kill cannot corrupt: metrics, evaluation and OOD records.

A batch of records goes down in one ``write`` of whole lines, flushed to disk.
A process killed inside that write can still leave an unterminated last line;
readers drop it with a warning, and the next append cuts it off first, so it
never runs into the following record.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from softtokens.errors import UsageError


def _cut_torn_tail(f, path: Path) -> None:
    """Truncate an unterminated last line (the trace of a kill mid-write) before appending."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    f.seek(0)
    keep = f.read().rfind(b"\n") + 1
    warnings.warn(f"{path}: dropped an unterminated last line ({size - keep} bytes) left by an interrupted write")
    f.truncate(keep)
    f.seek(keep)


def _lines(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def append(path: str | Path, records: list[dict]) -> None:
    """Append records as whole lines, durably (flushed and fsynced)."""
    path = Path(path)
    with open(path, "a+b") as f:
        _cut_torn_tail(f, path)
        f.write(_lines(records))
        f.flush()
        os.fsync(f.fileno())


def read(path: str | Path, repair: bool = False) -> list[dict]:
    """Every record; an unterminated last line (an interrupted write) is dropped with a warning, and with
    ``repair`` (the run that owns the file) cut from the file too.

    A broken line anywhere else is damage, not an interruption: an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        warnings.warn(f"{path}: ignoring an unterminated last line ({len(tail)} bytes) left by an interrupted write")
    if tail and repair:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}:{i}: corrupt record ({type(e).__name__}); the file was damaged, not "
                             "interrupted: delete it to redo its work") from None
    return out


def rewrite(path: str | Path, records: list[dict]) -> None:
    """Replace the file's records atomically (a temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_lines(records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
