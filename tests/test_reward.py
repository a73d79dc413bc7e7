import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from softtokens.reward import Grade, Grader, grade_one, last_boxed


@pytest.mark.parametrize(
    "gold, completion",
    [
        ("18", "\\boxed{18}"),
        ("18", "\\boxed{18.0}"),
        ("2,125", "\\boxed{2125}"),
        ("2125", "\\boxed{2,125}"),
        ("\\frac{1}{2}", "\\boxed{0.5}"),
        ("0.5", "\\boxed{\\dfrac{1}{2}}"),
        ("\\frac{3}{4}", "\\boxed{3/4}"),
        ("18", "\\boxed{\\$18}"),
        ("18", "\\boxed{18 \\text{ dollars}}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}"),
        ("72", "\\boxed{72}. The answer is 72"),
    ],
)
def test_equivalent_forms_score_100(gold, completion):
    g = grade_one(gold, completion)
    assert g.reward == 100 and g.correct and g.boxed


def test_wrong_boxed_scores_10_and_no_box_scores_0():
    assert grade_one("18", "\\boxed{17}").reward == 10
    assert grade_one("18", "\\boxed{banana}").reward == 10
    assert grade_one("18", "the answer is 18").reward == 0  # correct text, but no box
    assert grade_one("18", "\\boxed{18").reward == 0  # a box never closed
    assert grade_one("18", "\\boxed{}").reward == 0


def test_last_boxed_is_brace_matched():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("nothing") is None


ADVERSARIAL = [
    "\\boxed{" + "\\frac{1}{" * 3000 + "2" + "}" * 3001,  # deep nesting
    "\\boxed{" + "1+" * 500_000 + "1}",  # a megabyte of text
    "x" * 3_000_000 + "\\boxed{18}",  # megabytes before a correct box
    "\\boxed{\\frac{\\sqrt{}{}}}}}{{{\\left(}",  # broken LaTeX
    "\\boxed{١٨ 🤖 \u202e ∞ ∑ \x00}",  # unicode
    "\\boxed{9^{9^{9^{9}}}}",  # a power sympy would compute for hours, in C
]


@pytest.mark.slow
def test_adversarial_answers_score_within_the_timeout():
    with Grader(workers=1, timeout=1) as grader:
        grades = grader.grade([("18", a) for a in ADVERSARIAL])  # the power would take sympy hours: the guard stops it
        assert [g.correct for g in grades] == [False, False, True, False, False, False]
        assert all(g.reward in (0, 10) for g in grades[:2] + grades[3:])
        assert grader.grade([("7", "\\boxed{7}")])[0].reward == 100, "the grader works after a killed worker"


def test_grading_off_the_main_thread():
    out = {}

    def work():
        with Grader(workers=1, timeout=2) as grader:
            out["grades"] = grader.grade([("18", "\\boxed{18}"), ("1/2", "\\boxed{0.5}"), ("3", "\\boxed{4}")])
        try:
            Grader(workers=0).grade([("1", "\\boxed{1}")])
        except RuntimeError as e:
            out["inline"] = str(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert [g.reward for g in out["grades"]] == [100, 100, 10]
    assert "main thread" in out["inline"]


def _kill_workers(grader: Grader) -> None:
    for pid in grader.worker_pids():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_dead_worker_costs_only_its_chunk():
    """An out-of-memory kill of a worker: its chunk is graded again by another, not lost, and the run goes on."""
    pairs = [("7", "\\boxed{7}"), ("3", "\\boxed{4}"), ("5", "\\boxed{5}"), ("2", "no box")]
    with Grader(workers=2, timeout=2) as grader:
        assert [g.reward for g in grader.grade(pairs)] == [100, 10, 100, 0]
        handle = grader.submit(pairs + [("18", ADVERSARIAL[-1])])  # the last chunk keeps a worker busy
        _kill_workers(grader)
        assert [g.reward for g in grader.result(handle)][:4] == [100, 10, 100, 0]
        _kill_workers(grader)  # workers killed while idle
        time.sleep(1)
        assert [g.reward for g in grader.grade(pairs)] == [100, 10, 100, 0]


@pytest.mark.slow
def test_a_timeout_kills_only_the_stuck_worker():
    """The chunk past its guard scores 0 and its worker is replaced; a chunk beside it is graded, its worker kept.
    The guard (2 s here) is set shorter than Math-Verify's own timeout (30 s), so that it is what stops the power."""
    with Grader(workers=2, timeout=30, guard_slack=2 - 30 * 4) as grader:
        grader.grade([("1", "\\boxed{1}")] * 4)  # both workers up, sympy imported
        before = set(grader.worker_pids())
        stuck = grader.submit([("18", ADVERSARIAL[-1])])
        fine = grader.submit([("7", "\\boxed{7}")] * 3)
        assert [g.reward for g in grader.result(fine)] == [100] * 3
        assert [g.reward for g in grader.result(stuck)] == [0]
        deadline = time.time() + 10
        while time.time() < deadline and len(set(grader.worker_pids()) - before) < 1:
            time.sleep(0.1)
        after = set(grader.worker_pids())
        assert len(before & after) == 1 and len(after) == 2, "one worker replaced, the other kept"
        assert [g.reward for g in grader.grade([("7", "\\boxed{7}")])] == [100]


WATCHED = """
import multiprocessing.resource_tracker as rt, os, sys, time
from softtokens.reward import Grader
g = Grader(workers=2, timeout=2)
g.grade([("1", "\\\\boxed{1}")] * 8)
print(" ".join(str(p) for p in g.worker_pids()), rt._resource_tracker._pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for a reaper is dead too
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_workers_die_with_a_killed_parent():
    """kill -9 skips every handler: the workers notice the parent's death through its sentinel pipe."""
    proc = subprocess.Popen([sys.executable, "-c", WATCHED], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split() if x != "None"]
        assert len(pids) >= 2 and all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], "grading workers (or the resource tracker) outlived their parent"


NO_GUARD = """
print("script body runs", flush=True)
from softtokens.reward import Grader
grades = Grader(workers=2, timeout=2).grade([("7", "\\\\boxed{7}"), ("3", "\\\\boxed{4}")])
print("rewards", [g.reward for g in grades], flush=True)
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_grades(tmp_path):
    """spawn re-imports the parent's __main__ in every worker: a plain script would run again in each, then die
    in multiprocessing's bootstrapping check. The workers import softtokens.reward instead."""
    script = tmp_path / "plain.py"
    script.write_text(NO_GUARD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("script body runs") == 1 and "rewards [100.0, 10.0]" in out.stdout


EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "exact_match.py")


def _problems(targets):
    from softtokens.data import Problem

    return [Problem(str(i), f"capital {i}?", "", {"target": t, "id": str(i)}) for i, t in enumerate(targets)]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_trl_style_reward_sees_the_columns(workers):
    pairs = [("", "\\boxed{Paris}"), ("", "\\boxed{rome}"), ("", "\\boxed{Lyon}"), ("", "no box")]
    with Grader(workers=workers, reward=f"{EXAMPLE}:exact_match") as grader:
        grades = grader.grade(pairs, _problems(["Paris", "Rome", "Paris", "Paris"]))
    assert [g.reward for g in grades] == [1.0, 1.0, 0.1, 0.0]
    assert [g.correct for g in grades] == [True, True, False, False]


def _raises(prompts, completions, **columns):
    raise KeyError("target")


def _short(prompts, completions, **columns):
    return [1.0]


def test_a_local_function_is_called_in_process_and_checked():
    seen = {}

    def length(prompts, completions, target, **columns):  # defined in a function: workers cannot import it
        seen.update(prompts=prompts, target=target)
        return [float(len(c)) for c in completions]

    with Grader(workers=1, reward=length) as grader:
        grades = grader.grade([("", "\\boxed{ab}"), ("", "")], _problems(["x", "y"]))
    assert [g.reward for g in grades] == [10.0, 0.0]
    assert [g.correct for g in grades] == [None, None], "no gold answer and no verdicts: unknown, not reward > 0"
    assert seen == {"prompts": ["capital 0?", "capital 1?"], "target": ["x", "y"]}


@pytest.mark.parametrize("reward, message", [
    ("nosuchmodule_xyz:f", "cannot import nosuchmodule_xyz (ModuleNotFoundError"),
    (f"{EXAMPLE}:nothere", "exact_match.py has no function nothere"),
    ("examples/none.py:f", "no file examples/none.py"),
    ("just_a_name", "expected 'package.module:function'"),
])
def test_a_bad_reward_name_is_a_clear_error(reward, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Grader(workers=0, reward=reward)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("fn, message", [
    (_raises, "reward _raises raised KeyError: 'target'"),
    (_short, "reward _short returned 1 rewards for 2 completions"),
])
def test_a_reward_that_fails_names_the_function(fn, message, workers):
    with Grader(workers=workers, reward=fn) as grader:
        with pytest.raises(ValueError, match=re.escape(message)):
            grader.grade([("", "a"), ("", "b")], _problems(["x", "y"]))


def test_ctrl_c_while_grading_is_not_a_wrong_answer(monkeypatch):
    """Math-Verify's timeouts are BaseExceptions and mean 'not verified'; a KeyboardInterrupt must stop the run."""
    import math_verify
    from math_verify.errors import TimeoutException

    def timeout(*a, **kw):
        raise TimeoutException("slow")

    monkeypatch.setattr(math_verify, "parse", timeout)
    assert grade_one("7", "\\boxed{7}") == Grade(10.0, False, True)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(math_verify, "parse", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grade_one("7", "\\boxed{7}")


TRL = str(Path(__file__).resolve().parent / "data" / "trl_rewards.py")


class _Rollout:
    """What reward_rows reads of a rollout."""

    def __init__(self, cot, answer, mode="soft"):
        self.cot_text, self.prefill_text, self.answer_text, self.mode = cot, " The final answer is: \\boxed{", answer, mode
        self.cot_ids, self.prefill_ids, self.answer_ids = [1] * len(cot.split()), [2, 3], [4] * len(answer)


def _trl_batch(chat=False):
    from softtokens.data import Problem

    tasks = ["math", "code", "math"]
    question = lambda i: [{"role": "user", "content": f"q{i}"}] if chat else f"q{i}"  # noqa: E731
    problems = [Problem(str(i), question(i), "7", {"ground_truth": "7", "task": t}) for i, t in enumerate(tasks)]
    rollouts = [_Rollout("3 + 4 = 7.", "7}"), _Rollout("hmm", "8}"), _Rollout("", "}")]
    pairs = [("7", "\\boxed{" + r.answer_text) for r in rollouts]
    return pairs, problems, rollouts


@pytest.mark.parametrize("workers", [0, 1])
def test_trl_documented_rewards_run_unchanged(workers):
    """Called by keyword; completions are the whole completion (CoT, prefill, answer); columns by their names;
    None means 'does not apply'; several rewards are summed with their weights."""
    from softtokens.reward import TrainerState

    pairs, problems, rollouts = _trl_batch()
    whole = [r.cot_text + r.prefill_text + r.answer_text for r in rollouts]
    specs = [f"{TRL}:{f}" for f in ("reward_len", "reward_func", "math_reward_func", "step_reward", "ids_reward")]
    with Grader(workers=workers, reward=",".join(specs), reward_weights=[1.0, 10.0, 100.0, 1000.0, 0.5]) as grader:
        grades = grader.grade(pairs, problems, rollouts, TrainerState(global_step=3, max_steps=9))
    lengths = [-abs(20 - len(c)) for c in whole]
    ids = [len(r.cot_ids) + 2 + len(r.answer_ids) for r in rollouts]
    assert [g.parts for g in grades] == [(lengths[0], 1.0, 1.0, 3.0, ids[0]), (lengths[1], 0.0, None, 3.0, ids[1]),
                                         (lengths[2], 0.0, 1.0, 3.0, ids[2])]
    assert grades[1].reward == pytest.approx(lengths[1] + 3000 + 0.5 * ids[1]), "None is left out of the sum"
    assert grades[0].reward == pytest.approx(lengths[0] + 10 + 100 + 3000 + 0.5 * ids[0])
    assert grader.names == ["reward_len", "reward_func", "math_reward_func", "step_reward", "ids_reward"]


def test_a_chat_dataset_gets_completions_as_messages():
    pairs, problems, rollouts = _trl_batch(chat=True)
    rollouts[0].cot_text = "<think>add</think><answer>"
    rollouts[0].prefill_text, rollouts[0].answer_text = "", "7</answer>"
    with Grader(workers=0, reward=f"{TRL}:format_reward_func") as grader:
        assert [g.reward for g in grader.grade(pairs, problems, rollouts)] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_reward_that_never_returns_stops_the_run(workers):
    pairs, problems, rollouts = _trl_batch()
    with Grader(workers=workers, reward=f"{TRL}:hangs", reward_timeout=2) as grader:
        start = time.time()
        with pytest.raises(ValueError, match=re.escape("reward hangs did not return within reward_timeout 2 s")):
            grader.grade(pairs, problems, rollouts)
        assert time.time() - start < 30


@pytest.mark.parametrize("body, message", [
    ("return 'abc'", "must return a list of 2 numbers (None where it does not apply), got str 'abc'"),
    ("return ['1', 2.0]", "must return numbers or None; item 0 is str '1'"),
    ("return [float('nan'), 1.0]", "returned a non-finite reward at item 0: nan"),
    ("return [1.0]", "returned 1 rewards for 2 completions"),
    ("raise KeyError('solution')", "raised KeyError: 'solution'"),
    ("import time; time.sleep(60)", "did not return within reward_timeout 1 s"),
])
def test_a_bad_reward_fails_on_made_up_completions_first(tmp_path, body, message):
    from softtokens.data import Problem
    from softtokens.reward import check_rewards

    (tmp_path / "r.py").write_text(f"def bad(completions, **kwargs):\n    {body}\n")
    problems = [Problem("0", "What is 3 + 4?", "7", {"answer": "7"})]
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        check_rewards(f"{tmp_path / 'r.py'}:bad", None, problems, timeout=1)
    assert "before the model loads" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="reward_weights has 2 weights for 1 reward"):
        check_rewards(f"{tmp_path / 'r.py'}:bad", [1.0, 2.0], problems)


def test_a_reward_is_parsed_in_one_place(tmp_path):
    from softtokens.reward import Reward, parse_rewards, reward_record

    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    spec = f"{tmp_path / 'r.py'}:f"
    [from_file, example, from_module] = parse_rewards([spec, f"{EXAMPLE}:exact_match",
                                                       "softtokens.reward:last_boxed"])
    assert isinstance(from_file, Reward) and from_file.name == "f" and from_file.spec == spec == from_file.record
    assert example.name == "exact_match"
    assert example.fn(prompts=["q"], completions=["\\boxed{a}"], target=["a"])[0] == [1.0]
    assert from_module.spec == from_module.record == "softtokens.reward:last_boxed" and from_module.name == "last_boxed"
    nested = lambda completions, **kw: [0.0] * len(completions)  # noqa: E731
    [local] = parse_rewards(nested)
    assert local.spec is None and local.name == "<lambda>", "a function workers cannot import is called here"
    assert parse_rewards("") == [] and parse_rewards(None) == []
    assert reward_record(f"{spec},{spec}") == f"{spec},{spec}"
    with pytest.raises(ValueError, match="has no function g"):
        parse_rewards(f"{tmp_path / 'r.py'}:g")
