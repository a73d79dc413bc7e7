"""Rewards: Math-Verify's 100 / 10 / 0 with a correct / incorrect verdict (METHOD.md §4), or the user's own.

A user's reward has TRL's signature, ``f(prompts, completions, **columns) ->
list[float]`` (the columns are the dataset's other fields, as lists), and may
return ``(rewards, correct)`` to set the accuracy metrics; otherwise a reward
above 0 counts as correct. It is named ``package.module:function`` or
``path/to/file.py:function`` and runs in the same workers, under the same
guard, as Math-Verify.

Math-Verify's own timeouts use ``signal.alarm``, which only works in a main
thread (one RL framework scored every MATH item 0 because of it). So grading
runs in worker processes, each in its own main thread with Math-Verify's
timeouts on, behind an outer wall-clock guard that kills a worker stuck in C
code (a huge power in sympy, say). ``Grader(workers=0)`` grades inline, in
the main thread only.

A worker that dies (killed, out of memory) breaks the whole pool: the Grader
builds a new one and regrades only the chunks that were lost. Each worker
watches its parent through multiprocessing's parent sentinel (a pipe that
closes when the parent dies, whatever killed it) and exits with it, so a
kill -9 of a run leaves no grading processes behind. Workers start with this
module standing in for ``__main__``, so a user's script without an
``if __name__ == "__main__":`` guard is not run again in each of them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import importlib.machinery
import importlib.util
import math
import multiprocessing
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

CORRECT, BOXED, NONE = 100.0, 10.0, 0.0
MAX_CHARS = 20_000  # the graded text is short; anything longer is cut to its tail, where the box is


@dataclass(frozen=True)
class Grade:
    reward: float
    correct: bool
    boxed: bool


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched ``\\boxed{...}`` (or ``\\fbox{...}``), None without one."""
    for cmd in ("\\boxed", "\\fbox"):
        start = text.rfind(cmd + "{")
        if start < 0:
            continue
        i, depth = start + len(cmd) + 1, 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(cmd) + 1 : i - 1]
    return None


NUMBER = re.compile(r"-?(\d+(,\d{3})*|\d*)(\.\d+)?")


def is_number(text: str) -> bool:
    """Whether a boxed answer is a plain number (``-12``, ``1,250``, ``0.5``), not an expression."""
    text = text.strip().strip("$").strip().rstrip(".")
    return bool(text) and any(c.isdigit() for c in text) and NUMBER.fullmatch(text) is not None


def grade_one(gold: str, completion: str, timeout: float = 5.0, require_number: bool = False) -> Grade:
    """Gold first: verify(parse(gold), parse(boxed prediction)). Any failure is a wrong answer, not an error.

    ``require_number``: a boxed answer that is not a plain number is wrong, equal or not (Math-Verify
    evaluates ``\\boxed{20 + 10}`` to 30, which a policy can learn to exploit by copying the question).
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    boxed = last_boxed(completion[-MAX_CHARS:])
    if boxed is None or not boxed.strip():
        return Grade(NONE, False, False)
    if require_number and not is_number(boxed):
        return Grade(BOXED, False, True)
    seconds = max(1, int(round(timeout)))
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=seconds)
        pred_parsed = parse(f"$\\boxed{{{boxed}}}$", parsing_timeout=seconds)
        ok = bool(gold_parsed) and bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=seconds)
    except (Exception, TimeoutException):  # noqa: BLE001  timeouts (a BaseException there), RecursionError,
        # sympy errors: all mean "not verified"; Ctrl-C still stops the run
        ok = False
    return Grade(CORRECT if ok else BOXED, ok, True)


def load_reward(spec: str):
    """The function named by 'package.module:function' or 'path/to/file.py:function'; a clear error otherwise."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"reward {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise ValueError(f"reward {spec!r}: no file {where}")
            key = f"softtokens_reward_{abs(hash(str(path)))}"
            if key not in sys.modules:
                found = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(found)
                sys.modules[key] = module
                try:
                    found.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
            module = sys.modules[key]
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  any import failure: name it, no traceback
        raise ValueError(f"reward {spec!r}: cannot import {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {where} has no function {name}")
    return fn


def reward_spec(reward) -> tuple[str | None, object]:
    """(spec the workers import, or None; a function to call in this process, or None) for a reward given as
    None (Math-Verify), a spec string, or a function. A function workers cannot import (one defined in
    ``__main__`` or inside another function) is called in this process."""
    if reward is None or reward == "":
        return None, None
    if isinstance(reward, str):
        where, _, name = reward.rpartition(":")
        load_reward(reward)  # fail now, in this process, with the import error
        return (f"{Path(where).resolve()}:{name}" if where.endswith(".py") else reward), None
    if not callable(reward):
        raise ValueError(f"reward must be a 'module:function' string or a function, got {type(reward).__name__}")
    module, name = getattr(reward, "__module__", None), getattr(reward, "__qualname__", "")
    if module in (None, "__main__") or "." in name:
        return None, reward
    return f"{module}:{name}", None


def call_reward(fn, name: str, rows: list[tuple]) -> list[Grade]:
    """Call a TRL-style reward on (gold, completion, prompt, columns) rows and check what it returns."""
    n = len(rows)
    keys = list(dict.fromkeys(k for *_, cols in rows for k in cols))
    columns = {k: [cols.get(k) for *_, cols in rows] for k in keys}
    try:
        out = fn([r[2] for r in rows], [r[1] for r in rows], **columns)
    except Exception as e:  # noqa: BLE001  the user's code: name it
        raise ValueError(f"reward {name} raised {type(e).__name__}: {e}") from None
    correct = None
    if isinstance(out, tuple) and len(out) == 2:
        out, correct = out
    try:
        rewards = [float(x) for x in out]
    except (TypeError, ValueError):
        raise ValueError(f"reward {name} must return a list of {n} numbers (or (rewards, correct)), "
                         f"got {type(out).__name__}") from None
    if len(rewards) != n or (correct is not None and len(list(correct)) != n):
        raise ValueError(f"reward {name} returned {len(rewards)} rewards"
                         + (f" and {len(list(correct))} verdicts" if correct is not None else "")
                         + f" for {n} completions")
    if not all(math.isfinite(r) for r in rewards):
        raise ValueError(f"reward {name} returned a non-finite reward: {[r for r in rewards if not math.isfinite(r)][:3]}")
    correct = [r > 0 for r in rewards] if correct is None else [bool(c) for c in correct]
    return [Grade(r, c, last_boxed(row[1][-MAX_CHARS:]) is not None) for r, c, row in zip(rewards, correct, rows)]


_LOADED: dict[str, object] = {}


def _grade_many(rows: list[tuple], timeout: float, require_number: bool = False, reward: str | None = None) -> list[Grade]:
    """One chunk, in a worker (or inline): Math-Verify, or the user's reward imported by its spec."""
    if reward is None:
        return [grade_one(g, c, timeout, require_number) for g, c, *_ in rows]
    if reward not in _LOADED:
        _LOADED[reward] = load_reward(reward)
    return call_reward(_LOADED[reward], reward, rows)


def _exit_with_parent() -> None:
    """Worker initializer: a thread that ends this process when the parent's sentinel pipe closes."""
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def _workers_skip_user_main():
    """While workers start: spawn makes each child import the parent's ``__main__`` (its file, or its module
    under ``python -m``); pointing ``__main__.__spec__`` at this module makes them import this one instead."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    old = getattr(main, "__spec__", None)
    main.__spec__ = importlib.machinery.ModuleSpec(__name__, None)
    try:
        yield
    finally:
        main.__spec__ = old


class Grader:
    """Grades (gold, completion) pairs off the calling thread, so generation can go on meanwhile."""

    def __init__(self, workers: int = 2, timeout: float = 5.0, require_number: bool = False, reward=None):
        """``reward``: None (Math-Verify), 'module:function' / 'file.py:function', or a function."""
        if workers < 0:
            raise ValueError(f"grading workers must be >= 0, got {workers}")
        self.workers, self.timeout, self.require_number = workers, timeout, require_number
        self.reward, self._local = reward_spec(reward)
        self._pool: cf.ProcessPoolExecutor | None = None

    @property
    def custom(self) -> bool:
        """Whether a user's reward grades (rather than Math-Verify)."""
        return self.reward is not None or self._local is not None

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a forked child of a process running torch threads can deadlock
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_exit_with_parent)
        return self._pool

    def submit(self, pairs: list[tuple[str, str]], problems: list | None = None):
        """Start grading (gold, completion) pairs; returns a handle for ``result``. Inline graders grade now.

        ``problems`` (one per pair) give a custom reward its prompts and columns.
        """
        custom = self.custom
        if custom and (problems is None or len(problems) != len(pairs)):
            raise ValueError("a custom reward needs the problem of every completion (Grader.submit(pairs, problems))")
        rows = [(g, c, p.question, p.columns) for (g, c), p in zip(pairs, problems)] if custom else list(pairs)
        if self._local is not None:
            return call_reward(self._local, getattr(self._local, "__qualname__", "reward"), rows)
        if self.workers == 0:
            if self.reward is None and threading.current_thread() is not threading.main_thread():
                raise RuntimeError("inline grading (workers=0) needs the main thread: Math-Verify's timeouts use signals")
            return _grade_many(rows, self.timeout, self.require_number, self.reward)
        # Math-Verify goes out in chunks over the workers; a custom reward sees the whole batch in one call, as in TRL
        chunk = max(1, len(rows) // (4 * self.workers)) if self.reward is None else max(1, len(rows))
        return [self._submit(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]

    def _submit(self, rows: list[tuple]):
        for _ in range(2):
            pool = self._executor()
            try:
                with _workers_skip_user_main():  # submit starts the workers
                    return rows, pool, pool.submit(_grade_many, rows, self.timeout, self.require_number, self.reward)
            except cf.process.BrokenProcessPool:  # a worker died while the pool was idle
                self._kill()
        raise RuntimeError("the grading pool breaks as soon as it starts: see the workers' errors above")

    def result(self, handle) -> list[Grade]:
        """The grades of a submitted batch. A chunk that outlives its guard (3 Math-Verify calls per pair,
        each under the timeout) scores 0 and its worker is killed. A chunk lost to a dead worker is regraded
        in a fresh pool, twice at most (then it scores 0: its input kills workers)."""
        if self.workers == 0 or self._local is not None:
            return handle
        out = []
        for pairs, pool, fut in handle:
            zeros = [Grade(NONE, False, last_boxed(c[-MAX_CHARS:]) is not None) for _, c, *_ in pairs]
            for attempt in range(3):
                try:
                    out += fut.result(timeout=self.timeout * (3 * len(pairs) + 1) + 5)
                except cf.TimeoutError:
                    self._kill()
                    out += zeros
                except (cf.process.BrokenProcessPool, cf.CancelledError):
                    if attempt < 2:
                        if self._pool is pool:  # the pool that lost it is broken for good: start a new one
                            self._kill()
                        _, pool, fut = self._submit(pairs)
                        continue
                    out += zeros
                break
        return out

    def grade(self, pairs: list[tuple[str, str]], problems: list | None = None) -> list[Grade]:
        return self.result(self.submit(pairs, problems))

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for p in list(getattr(pool, "_processes", {}).values()):
                p.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RewardFunction:
    """Any Python reward, (gold, completion) pairs -> Grades, behind the Grader's interface (experiments, tests)."""

    def __init__(self, fn):
        self.fn = fn

    def submit(self, pairs: list[tuple[str, str]], problems: list | None = None):
        return self.fn(pairs)

    def result(self, handle) -> list[Grade]:
        return handle

    def grade(self, pairs: list[tuple[str, str]], problems: list | None = None) -> list[Grade]:
        return self.fn(pairs)
