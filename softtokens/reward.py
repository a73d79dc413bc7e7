"""Grading answers with Math-Verify (METHOD.md §4): the paper's 100 / 10 / 0 reward and a correct / incorrect verdict.

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
import importlib.machinery
import multiprocessing
import os
import re
import sys
import threading
from dataclasses import dataclass

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
    except BaseException:  # noqa: BLE001  timeouts, RecursionError, sympy errors: all mean "not verified"
        ok = False
    return Grade(CORRECT if ok else BOXED, ok, True)


def _grade_many(pairs: list[tuple[str, str]], timeout: float, require_number: bool = False) -> list[Grade]:
    return [grade_one(g, c, timeout, require_number) for g, c in pairs]


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

    def __init__(self, workers: int = 2, timeout: float = 5.0, require_number: bool = False):
        if workers < 0:
            raise ValueError(f"grading workers must be >= 0, got {workers}")
        self.workers, self.timeout, self.require_number = workers, timeout, require_number
        self._pool: cf.ProcessPoolExecutor | None = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a forked child of a process running torch threads can deadlock
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_exit_with_parent)
        return self._pool

    def submit(self, pairs: list[tuple[str, str]]):
        """Start grading; returns a handle for ``result``. Inline graders grade now."""
        if self.workers == 0:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("inline grading (workers=0) needs the main thread: Math-Verify's timeouts use signals")
            return _grade_many(pairs, self.timeout, self.require_number)
        chunk = max(1, len(pairs) // (4 * self.workers))
        return [self._submit(pairs[i : i + chunk]) for i in range(0, len(pairs), chunk)]

    def _submit(self, pairs: list[tuple[str, str]]):
        for _ in range(2):
            pool = self._executor()
            try:
                with _workers_skip_user_main():  # submit starts the workers
                    return pairs, pool, pool.submit(_grade_many, pairs, self.timeout, self.require_number)
            except cf.process.BrokenProcessPool:  # a worker died while the pool was idle
                self._kill()
        raise RuntimeError("the grading pool breaks as soon as it starts: see the workers' errors above")

    def result(self, handle) -> list[Grade]:
        """The grades of a submitted batch. A chunk that outlives its guard (3 Math-Verify calls per pair,
        each under the timeout) scores 0 and its worker is killed. A chunk lost to a dead worker is regraded
        in a fresh pool, twice at most (then it scores 0: its input kills workers)."""
        if self.workers == 0:
            return handle
        out = []
        for pairs, pool, fut in handle:
            zeros = [Grade(NONE, False, last_boxed(c[-MAX_CHARS:]) is not None) for _, c in pairs]
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

    def grade(self, pairs: list[tuple[str, str]]) -> list[Grade]:
        return self.result(self.submit(pairs))

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

    def submit(self, pairs: list[tuple[str, str]]):
        return self.fn(pairs)

    def result(self, handle) -> list[Grade]:
        return handle

    def grade(self, pairs: list[tuple[str, str]]) -> list[Grade]:
        return self.fn(pairs)
