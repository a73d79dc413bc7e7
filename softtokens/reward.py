"""Rewards: Math-Verify's 100 / 10 / 0 with a correct / incorrect verdict (METHOD.md §4), or the user's own.

A user's reward is called as TRL's GRPOTrainer calls one, by keyword:
``f(prompts=, completions=, completion_ids=, trainer_state=, **columns)``, where
``completions`` are the whole completions (the CoT text -- for soft and fuzzy
CoTs the greedy shadow -- then the prefill and the answer; as one assistant
message when the question is a chat) and every dataset column arrives under its
own name, the answer column included. softtokens adds ``answers=`` (the graded
``\\boxed{...}`` text) and ``cot_modes=``. A reward returns one float per
completion, or None where it does not apply; it may return ``(rewards,
correct)`` to set the accuracy metrics; otherwise a completion is right when
Math-Verify finds its answer equal to the gold column's, and where there is
no gold answer accuracy is not reported (a reward's value is never a
verdict). Several rewards are summed with ``reward_weights`` (None entries
left out), as in TRL. A reward is named ``package.module:function`` or
``path/to/file.py:function`` and runs in the grading workers, under a time
limit (``reward_timeout``): a reward that does not return stops the run with
an error, it never scores the batch 0.

Math-Verify's own timeouts use ``signal.alarm``, which only works in a main
thread (one RL framework scored every MATH item 0 because of it). So grading
runs in worker processes, each in its own main thread with Math-Verify's
timeouts on, behind an outer wall-clock guard per chunk that kills the one
worker stuck in C code (a huge power in sympy, say) and starts another, the
other chunks grading on (pebble's process pool). ``Grader(workers=0)``
grades inline, in the main thread only.

A worker that dies (killed, out of memory) costs only its chunk, which
another worker grades again. Each worker
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
import numbers
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pebble

from softtokens.errors import UsageError

if TYPE_CHECKING:
    from softtokens.config import GradingConfig

CORRECT, BOXED, NONE = 100.0, 10.0, 0.0
MAX_CHARS = 20_000  # the graded text is short; anything longer is cut to its tail, where the box is


@dataclass(frozen=True)
class Grade:
    reward: float
    correct: bool | None
    """None: unknown (a user's reward gave no verdicts and the row has no gold answer)."""
    boxed: bool
    parts: tuple = ()
    """With user rewards: each reward's value for this completion (None where it did not apply)."""


@dataclass(frozen=True)
class TrainerState:
    """What a reward's ``trainer_state`` holds (the fields of TRL's TrainerState a reward reads)."""

    global_step: int = 0
    max_steps: int = 0


@dataclass(frozen=True)
class RewardRow:
    """One completion as a user's reward sees it."""

    gold: str
    answer: str
    """The graded text: ``\\boxed{`` and the answer."""
    prompt: object
    columns: dict = field(default_factory=dict)
    completion: str = ""
    """CoT text, prefill and answer."""
    completion_ids: tuple = ()
    cot_mode: str = ""
    chat: bool = False


# What a reward is called with besides the dataset's columns (a column of the same name is not passed).
RESERVED = ("prompts", "completions", "completion_ids", "answers", "cot_modes", "trainer_state")


class RewardTimeout(UsageError):
    """A user's reward did not return within reward_timeout."""


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


_IMPORTING: list[str] = []  # reward files being imported now (a file that starts training at import is refused)


def importing_reward() -> str | None:
    """The reward file being imported, if any: ``train`` called from it would start a run inside the run."""
    return _IMPORTING[-1] if _IMPORTING else None


def load_reward(spec: str):
    """The function named by 'package.module:function' or 'path/to/file.py:function'; a clear error otherwise.
    The file of the script now running (``__main__``) is not imported again: its functions are taken from it."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"reward {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise UsageError(f"reward {spec!r}: no file {where}")
            key = f"softtokens_reward_{abs(hash(str(path)))}"
            running = getattr(sys.modules.get("__main__"), "__file__", None)
            if running and Path(running).resolve() == path:
                sys.modules[key] = sys.modules["__main__"]
            if key not in sys.modules:
                found = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(found)
                sys.modules[key] = module
                _IMPORTING.append(where)
                try:
                    found.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
                finally:
                    _IMPORTING.pop()
            module = sys.modules[key]
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001  any import failure: name it, no traceback
        raise UsageError(f"reward {spec!r}: cannot import {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"reward {spec!r}: {where} has no function {name}")
    return fn


@dataclass(frozen=True)
class Reward:
    """One user reward, parsed and loaded once (``parse_rewards``)."""

    name: str
    """Its function's name: the reward's metrics (rewards/<name>/mean) and its error messages."""
    fn: Callable
    spec: str | None
    """What a grading worker imports ('module:function', a file's absolute path); None for a function only this
    process can call (one defined in ``__main__`` or inside another function)."""
    record: str
    """What config.yaml records, so that ``--resume`` finds the function again (``reward_record``)."""


def parse_rewards(reward) -> list[Reward]:
    """Every reward of ``reward`` loaded, each import error named now: the one place a reward is parsed. ``reward``:
    '' or None (Math-Verify's grading: no user reward), 'a.py:f,b.py:g', a list of such specs and functions, or
    one function; rewards parsed already are taken as they are."""
    return [_parse(r) for r in split_rewards(reward)]


def _parse(reward) -> Reward:
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        where, _, name = reward.rpartition(":")
        fn = load_reward(reward)
        return Reward(name, fn, f"{Path(where).resolve()}:{name}" if where.endswith(".py") else reward, reward)
    if not callable(reward):
        raise UsageError(f"reward must be a 'module:function' string or a function, got {type(reward).__name__}")
    module, qualname = getattr(reward, "__module__", None), getattr(reward, "__qualname__", "")
    spec = None if module in (None, "__main__") or "." in qualname else f"{module}:{qualname}"
    record = spec
    if record is None:  # the running script's function: its file, which a resume from the command line imports
        script = getattr(sys.modules.get(module or ""), "__file__", None)
        qualname = qualname or getattr(reward, "__name__", "reward")
        record = (f"{Path(script).resolve()}:{qualname}" if script and "." not in qualname
                  else f"{module or '?'}:{qualname}")
    return Reward(getattr(reward, "__name__", "reward"), reward, spec, record)


def _values(out, name: str, n: int) -> tuple[list, list | None]:
    """A reward's return value checked: n numbers or None, and the optional verdicts."""
    correct = None
    if isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, (list, tuple)) for x in out):
        out, correct = out
    if not isinstance(out, (list, tuple)) and not (hasattr(out, "tolist") and not isinstance(out, (str, bytes))):
        raise UsageError(f"reward {name} must return a list of {n} numbers (None where it does not apply), "
                         f"got {type(out).__name__} {str(out)[:60]!r}")
    out = list(out.tolist() if hasattr(out, "tolist") else out)
    if len(out) != n or (correct is not None and len(correct) != n):
        raise UsageError(f"reward {name} returned {len(out)} rewards"
                         + (f" and {len(correct)} verdicts" if correct is not None else "") + f" for {n} completions")
    for i, x in enumerate(out):
        if x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
            raise UsageError(f"reward {name} must return numbers or None; item {i} is {type(x).__name__} {x!r}")
        if x is not None and not math.isfinite(x):
            raise UsageError(f"reward {name} returned a non-finite reward at item {i}: {x}")
    return [None if x is None else float(x) for x in out], correct


def call_reward(fn, name: str, rows: list[RewardRow], state: TrainerState | None = None) -> tuple[list, list | None]:
    """Call one user reward as TRL does (keywords, every column under its own name); its checked values."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r.columns) if k not in RESERVED]
    completions = [[{"role": "assistant", "content": r.completion}] if r.chat else r.completion for r in rows]
    try:
        out = fn(prompts=[r.prompt for r in rows], completions=completions,
                 completion_ids=[list(r.completion_ids) for r in rows], answers=[r.answer for r in rows],
                 cot_modes=[r.cot_mode for r in rows], trainer_state=state or TrainerState(),
                 **{k: [r.columns.get(k) for r in rows] for k in keys})
    except RewardTimeout:
        raise
    except Exception as e:  # noqa: BLE001  the user's code: name it
        raise UsageError(f"reward {name} raised {type(e).__name__}: {e}") from None
    return _values(out, name, len(rows))


def combine(rewards: list[Reward], weights: list[float] | None, rows: list[RewardRow],
            state: TrainerState | None = None, timeout: float = 5.0, require_number: bool = False) -> list[Grade]:
    """Every reward on the batch, summed with its weight (None entries left out, as TRL's nansum). Whether a
    completion is right: the verdicts of the first reward that gives some; else Math-Verify's on the gold answer
    where the row has one; else unknown (None), and no accuracy is reported. A reward's value is never read as
    a verdict: a reward that is positive for wrong answers would otherwise report them right."""
    weights = weights or [1.0] * len(rewards)
    values, verdicts = [], None
    for r in rewards:
        v, c = call_reward(r.fn, r.name, rows, state)
        values.append(v)
        verdicts = verdicts if verdicts is not None or c is None else [bool(x) for x in c]
    grades = []
    for i, row in enumerate(rows):
        parts = tuple(v[i] for v in values)
        total = sum(w * x for w, x in zip(weights, parts) if x is not None)
        if verdicts is not None:
            correct = verdicts[i]
        elif row.gold:
            correct = grade_one(row.gold, row.answer, timeout, require_number).correct
        else:
            correct = None
        grades.append(Grade(total, correct, last_boxed(row.answer[-MAX_CHARS:]) is not None, parts))
    return grades


def reward_record(reward) -> str:
    """What config.yaml records of the rewards given to ``train(reward_fn=)``, so that the run can be resumed
    and reloaded: each function as 'package.module:function', or 'path/to/script.py:function' for one defined in
    the script that runs (a resume from the command line imports that file: keep its training call under
    ``if __name__ == "__main__":``). A lambda or a nested function is recorded by its name, which only a resume
    that passes the function again can use."""
    return ",".join(r.record for r in parse_rewards(reward))


def split_rewards(reward) -> list:
    """'a.py:f,b.py:g', ['a.py:f', fn] or fn -> the list of rewards ('' or None: none)."""
    if reward is None or reward == "":
        return []
    if isinstance(reward, str):
        return [x.strip() for x in reward.split(",") if x.strip()]
    return list(reward) if isinstance(reward, (list, tuple)) else [reward]


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise RewardTimeout in the main thread when the body outlives ``seconds`` (a SIGUSR1 sent by a timer
    thread interrupts even a sleep). Elsewhere than in the main thread, no limit."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    active = [True]

    def on_timeout(signum, frame):
        if active[0]:
            active[0] = False
            raise RewardTimeout(f"{what} did not return within reward_timeout {seconds:g} s: fix it, or raise "
                                "reward_timeout")

    old = signal.signal(signal.SIGUSR1, on_timeout)
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        active[0] = False
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, old)


_LOADED: dict[str, Reward] = {}


def _grade_many(rows: list, timeout: float, require_number: bool = False, rewards: tuple = (),
                weights: list[float] | None = None, state: TrainerState | None = None) -> list[Grade]:
    """One chunk, in a worker (or inline): Math-Verify, or the user's rewards imported by their specs."""
    if not rewards:
        return [grade_one(g, c, timeout, require_number) for g, c, *_ in rows]
    for spec in rewards:
        if spec not in _LOADED:
            _LOADED[spec] = _parse(spec)
    return combine([_LOADED[spec] for spec in rewards], weights, rows, state, timeout, require_number)


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
    """While a worker starts: spawn makes each child import the parent's ``__main__`` (its file, or its module
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


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        with _workers_skip_user_main():
            super().start()


class _WorkerContext(multiprocessing.context.SpawnContext):
    """spawn (a forked child of a process running torch threads can deadlock), every worker started with this
    module standing in for the user's ``__main__``: the first ones and those that replace a killed worker."""

    Process = _WorkerProcess


@dataclass
class Chunk:
    """Rows out for grading in one worker: what a regrade needs, and the future of their grades."""

    rows: list
    state: TrainerState | None
    future: cf.Future
    """pebble's ProcessFuture: its timeout counts from when a worker takes the chunk."""


@dataclass
class Handle:
    """What ``Grader.submit`` returns, whatever grades: the grades themselves (inline), or the chunks out."""

    grades: list[Grade] | None = None
    chunks: list[Chunk] = field(default_factory=list)


class Grader:
    """Grades (gold, completion) pairs off the calling thread, so generation can go on meanwhile."""

    def __init__(self, workers: int = 2, timeout: float = 5.0, require_number: bool = False, reward=None,
                 reward_weights: list[float] | None = None, reward_timeout: float | None = 120.0,
                 guard_slack: float = 5.0):
        """``reward``: None (Math-Verify), 'module:function' / 'file.py:function', a function, or a list of
        them (comma-separated in a string), summed with ``reward_weights``. ``guard_slack``: the seconds a
        Math-Verify chunk's guard allows beyond its calls' timeouts (a fresh worker starts and imports sympy)."""
        if workers < 0:
            raise UsageError(f"grading workers must be >= 0, got {workers}")
        self.workers, self.timeout, self.require_number, self.guard_slack = workers, timeout, require_number, guard_slack
        rewards = parse_rewards(reward)
        check_reward_weights(rewards, reward_weights)
        self.names = [r.name for r in rewards]
        self.weights, self.reward_timeout = reward_weights, reward_timeout
        local = any(r.spec is None for r in rewards)  # a function workers cannot import: all are called here
        self.reward = None if local else tuple(r.spec for r in rewards)  # what the workers import
        self._local = rewards if local else None
        self._pool: pebble.ProcessPool | None = None

    @classmethod
    def from_config(cls, grading: GradingConfig, require_number: bool, reward=None) -> Grader:
        """The grader a run's grading section describes; ``reward``: rewards given in Python, in place of its own."""
        return cls(grading.grading_workers, grading.grading_timeout, require_number, reward or grading.reward,
                   grading.reward_weights, grading.reward_timeout)

    @property
    def custom(self) -> bool:
        """Whether user rewards grade (rather than Math-Verify)."""
        return bool(self.reward) or self._local is not None

    def _executor(self) -> pebble.ProcessPool:
        if self._pool is not None and not self._pool.active:  # pebble gives up on a pool whose idle workers died
            self.close()
        if self._pool is None:
            self._pool = pebble.ProcessPool(self.workers, initializer=_exit_with_parent, context=_WorkerContext())
        return self._pool

    def worker_pids(self) -> list[int]:
        """The grading workers' process ids (for checks: a worker killed from outside)."""
        if self._pool is None:
            return []
        return [w.pid for w in list(self._pool._pool_manager.worker_manager.workers.values()) if w.pid is not None]

    def submit(self, pairs: list[tuple[str, str]], problems: list | None = None, rollouts: list | None = None,
               state: TrainerState | None = None) -> Handle:
        """Start grading (gold, completion) pairs; ``result`` gives the grades. Inline graders grade now.

        ``problems`` (one per pair) give user rewards their prompts and columns, ``rollouts`` the whole
        completions and their token ids, ``state`` the training step.
        """
        custom = self.custom
        if custom and (problems is None or len(problems) != len(pairs)):
            raise UsageError("a custom reward needs the problem of every completion (Grader.submit(pairs, problems))")
        rows = reward_rows(pairs, problems, rollouts) if custom else list(pairs)
        if self._local is not None:
            with time_limit(self.reward_timeout, f"reward {', '.join(self.names)}"):
                return Handle(combine(self._local, self.weights, rows, state, self.timeout, self.require_number))
        if self.workers == 0:
            if not custom and threading.current_thread() is not threading.main_thread():
                raise RuntimeError("inline grading (workers=0) needs the main thread: Math-Verify's timeouts use signals")
            with time_limit(self.reward_timeout if custom else None, f"reward {', '.join(self.names)}"):
                return Handle(_grade_many(rows, self.timeout, self.require_number, self.reward or (), self.weights,
                                          state))
        # Math-Verify goes out in chunks over the workers; user rewards see the whole batch in one call, as in TRL
        chunk = max(1, len(rows) // (4 * self.workers)) if not custom else max(1, len(rows))
        return Handle(chunks=[self._submit(rows[i : i + chunk], state) for i in range(0, len(rows), chunk)])

    def _submit(self, rows: list, state: TrainerState | None = None) -> Chunk:
        # a Math-Verify chunk's guard: 3 calls per pair, each under the timeout; a user reward's: reward_timeout
        limit = self.reward_timeout if self.custom else self.timeout * (3 * len(rows) + 1) + self.guard_slack
        future = self._executor().schedule(_grade_many, (rows, self.timeout, self.require_number, self.reward or (),
                                                         self.weights, state), timeout=limit)
        return Chunk(rows, state, future)

    def result(self, handle: Handle) -> list[Grade]:
        """The grades of a submitted batch. A chunk that outlives its guard (counted from when a worker takes
        it) has its worker killed and replaced, the other chunks grading on: a Math-Verify chunk scores 0, a
        user reward stops the run (RewardTimeout). A chunk whose worker died (killed, out of memory) is regraded
        by another, twice at most (then it scores 0: its input kills workers)."""
        if handle.grades is not None:
            return handle.grades
        return [g for chunk in handle.chunks for g in self._chunk_result(chunk)]

    def _chunk_result(self, chunk: Chunk) -> list[Grade]:
        rows = chunk.rows
        for attempt in range(3):
            try:
                return chunk.future.result()
            except TimeoutError:
                if self.custom:
                    raise RewardTimeout(f"reward {', '.join(self.names)} did not return within reward_timeout "
                                        f"{self.reward_timeout:g} s (a batch of {len(rows)} completions): fix it, or "
                                        "raise reward_timeout") from None
                break
            except (pebble.ProcessExpired, cf.process.BrokenProcessPool, cf.CancelledError):
                if attempt < 2:
                    chunk = self._submit(rows, chunk.state)
        return [Grade(NONE, False, last_boxed((r.answer if isinstance(r, RewardRow) else r[1])[-MAX_CHARS:])
                      is not None) for r in rows]

    def grade(self, pairs: list[tuple[str, str]], problems: list | None = None, rollouts: list | None = None,
              state: TrainerState | None = None) -> list[Grade]:
        return self.result(self.submit(pairs, problems, rollouts, state))

    def close(self) -> None:
        """Stop the workers and drop any chunk still out (its grades are no longer wanted)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RewardFunction:
    """Any Python reward, (gold, completion) pairs -> Grades, behind the Grader's interface (experiments, tests)."""

    names: list[str] = []

    def __init__(self, fn):
        self.fn = fn

    def submit(self, pairs: list[tuple[str, str]], problems: list | None = None, rollouts=None, state=None) -> Handle:
        return Handle(self.fn(pairs))

    def result(self, handle: Handle) -> list[Grade]:
        return handle.grades

    def grade(self, pairs: list[tuple[str, str]], problems: list | None = None, rollouts=None, state=None) -> list[Grade]:
        return self.fn(pairs)


def check_reward_weights(rewards: list, weights: list[float] | None) -> None:
    if weights is not None and len(weights) != len(rewards):
        raise UsageError(f"reward_weights has {len(weights)} weights for {len(rewards)} reward(s): give one per reward")


def reward_rows(pairs: list[tuple[str, str]], problems: list, rollouts: list | None = None) -> list[RewardRow]:
    """What user rewards see of each completion: the problem's prompt and columns, and, given the rollouts, the
    whole completion (CoT, prefill, answer), its token ids and the CoT mode."""
    from softtokens.data import is_chat

    rows = []
    for i, ((gold, answer), p) in enumerate(zip(pairs, problems)):
        r = rollouts[i] if rollouts is not None else None
        whole = r.cot_text + r.prefill_text + r.answer_text if r is not None else answer
        ids = tuple(r.cot_ids) + tuple(r.prefill_ids) + tuple(r.answer_ids) if r is not None else ()
        rows.append(RewardRow(gold, answer, p.question, p.columns, whole, ids, r.mode if r is not None else "",
                              is_chat(p.question)))
    return rows


def check_rewards(reward, weights: list[float] | None, problems: list, timeout: float | None = 120.0) -> list[Grade]:
    """Call the user's rewards once, in this process, on two made-up completions of the dataset's first rows
    (a right boxed answer and an empty one): a reward that raises, hangs, returns the wrong length, a string or
    NaN fails here, in one line, before the model loads. Returns their grades (none without user rewards)."""
    from softtokens.data import is_chat
    from softtokens.prompts import ANSWER_PREFIX

    rewards = parse_rewards(reward)
    if not rewards or not problems:
        return []
    check_reward_weights(rewards, weights)
    p = problems[0]
    answers = [ANSWER_PREFIX + (p.answer or "0") + "}", ANSWER_PREFIX + "}"]
    rows = [RewardRow(p.answer, a, p.question, p.columns, "Let me think. The final answer is: " + a, (), "hard",
                      is_chat(p.question)) for a in answers]
    try:
        with time_limit(timeout, f"reward {', '.join(r.name for r in rewards)}"):
            return combine(rewards, weights, rows, TrainerState(0, 1))
    except ValueError as e:
        raise type(e)(f"{e} (checked on made-up completions of the dataset's first row, before the model loads)") \
            from None
