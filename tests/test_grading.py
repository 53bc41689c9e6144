"""The grading pool: MATH-500 reference agreement, equivalences, hard timeouts, crashed/hung workers, injections."""

import json
import os
import signal
import threading
import time

import pytest

from align.grading import Grader, GraderError, GradeResult


TIMEOUT_S = 1.0

EQUIVALENT = [  # (gold, predicted)
    ("\\frac12", "0.5"),
    ("\\frac12", "1/2"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"),
    ("90^\\circ", "90"),
    ("\\text{(C)}", "C"),
    ("C", "\\text{(C)}"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("10\\%", "10"),
    ("\\$5", "5"),
    ("1,000", "1000"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("[1,2)", "[1, 2)"),
    ("x=5", "5"),
    ("2x+1", "1+2x"),
]
NOT_EQUIVALENT = [
    ("2", "3"),
    ("-3", "3"),
    ("\\frac12", "0.51"),
    ("(1,2)", "(2,1)"),
    ("[1,2)", "(1,2]"),
    ("x^2", "x^3"),
    ("\\text{Evelyn}", "\\text{Bob}"),
    ("\\sqrt{2}", "2"),
]


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout_s=TIMEOUT_S) as pool:
        pool.grade("$\\boxed{1}$", "1")  # start the workers outside the timed tests
        yield pool


def boxed(answer: str) -> str:
    return f"We compute carefully.\n\nThe answer is $\\boxed{{{answer}}}$."


def test_math500_reference_solutions_grade_correct(grader):
    path = os.environ.get("ALIGN_MATH500")
    if not path or not os.path.exists(path):
        pytest.skip("set ALIGN_MATH500 to the MATH-500 jsonl (.ci/run does) to check reference agreement")
    with open(path) as handle:
        rows = [json.loads(line) for line in handle]
    results = grader.grade_many([(row["solution"], row["answer"]) for row in rows])
    failures = [
        (row["unique_id"], row["answer"], r.extracted, r.verdict) for row, r in zip(rows, results) if not r.correct
    ]
    print(f"\nMATH-500 reference agreement: {len(rows) - len(failures)}/{len(rows)}; failures: {failures}")
    assert len(rows) == 500
    assert len(failures) <= 5, failures


@pytest.mark.parametrize(("gold", "predicted"), EQUIVALENT)
def test_equivalent_answers_grade_correct(grader, gold, predicted):
    result = grader.grade(boxed(predicted), gold)
    assert result.verdict == "correct", result
    assert grader.equivalent(gold, predicted)


@pytest.mark.parametrize(("gold", "predicted"), NOT_EQUIVALENT)
def test_different_answers_grade_incorrect(grader, gold, predicted):
    result = grader.grade(boxed(predicted), gold)
    assert result == GradeResult("incorrect", result.extracted) and result.extracted is not None
    assert not grader.equivalent(gold, predicted)


def test_extraction_takes_the_last_boxed_answer_and_needs_an_anchor(grader):
    assert grader.grade("First $\\boxed{3}$, no wait: $\\boxed{4}$.", "4") == GradeResult("correct", "4")
    assert grader.grade("The final answer is $7$.", "7").verdict == "correct"
    # a bare number is not an answer: the prompt asks for \boxed{}, and plain text is never eval-ed
    assert grader.grade("so it is 7", "7") == GradeResult("no_answer", None)
    assert grader.grade("", "7") == GradeResult("no_answer", None)
    # math-verify alone would take "$80 - 18$" after the word "answer" and grade it equal to 62
    assert grader.grade("To find the answer to $80 - 18$, I add. So it is 6.", "62").verdict == "no_answer"


def test_results_keep_input_order_and_duplicates(grader):
    items = [(boxed("1"), "1"), (boxed("2"), "1"), (boxed("1"), "1"), ("nothing", "1")]
    assert [r.verdict for r in grader.grade_many(items)] == ["correct", "incorrect", "correct", "no_answer"]
    assert grader.grade_many([]) == []


PATHOLOGICAL = {
    "tower": "$\\boxed{9^{9^{9^{9}}}}$",
    "factorials": "$\\boxed{10!!!!!!!}$",
    "megabyte_sum": "\\boxed{" + "1+" * 500_000 + "1}",
    "megabyte_braces": "\\boxed{" * 200_000,
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_answers_time_out_within_the_budget(grader, name):
    start = time.monotonic()
    result = grader.grade(PATHOLOGICAL[name], "5")
    elapsed = time.monotonic() - start
    assert result.verdict in ("timeout", "incorrect", "no_answer") and not result.correct
    assert elapsed <= TIMEOUT_S + 1.0, f"{name} took {elapsed:.2f} s"


def test_long_but_harmless_text_is_graded(grader):
    assert grader.grade("x" * 1_000_000 + " so $\\boxed{5}$", "5").verdict == "correct"


def test_a_pathological_item_does_not_block_the_others(grader):
    items = [(PATHOLOGICAL["tower"], "5")] + [(boxed(str(i)), str(i)) for i in range(30)]
    start = time.monotonic()
    results = grader.grade_many(items)
    elapsed = time.monotonic() - start
    assert results[0].verdict == "timeout"
    assert all(r.correct for r in results[1:])
    # the other worker grades the 30 easy items while one is stuck: the batch costs about one timeout
    assert elapsed <= TIMEOUT_S + 1.0 + 1.0


INJECTIONS = [
    "$\\boxed{__import__('os').system('touch {marker}')}$",
    "$\\boxed{eval(\"open('{marker}', 'w')\")}$",
    "$\\boxed{exec('import os; os.system(\"touch {marker}\")')}$",
    "The final answer is __import__('os').system('touch {marker}')",
    "answer: (lambda: __import__('os').system('touch {marker}'))()",
    "$\\boxed{\\text{__import__('os').system('touch {marker}')}}$",
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_injection_strings_are_inert(grader, tmp_path, template):
    marker = tmp_path / "pwned"
    completion = template.replace("{marker}", str(marker))
    result = grader.grade(completion, "0")
    assert not result.correct
    assert grader.equivalent(completion, "0") is False
    time.sleep(0.1)
    assert not marker.exists(), "model output was executed"


def _after(delay_s: float, action):
    timer = threading.Timer(delay_s, action)
    timer.start()
    return timer


def test_a_crashed_worker_is_replaced_and_grading_goes_on():
    with Grader(num_workers=1, timeout_s=2.0) as pool:
        pool.grade(boxed("1"), "1")
        (pid,) = pool.worker_pids
        # kill the worker while it is stuck on a pathological item; the item is retried once, then times out
        timer = _after(0.3, lambda: os.kill(pid, signal.SIGKILL))
        results = pool.grade_many([(PATHOLOGICAL["factorials"], "5"), (boxed("2"), "2"), (boxed("3"), "4")])
        timer.join()
        assert [r.verdict for r in results] == ["timeout", "correct", "incorrect"]
        assert pool.replaced_workers >= 1 and pid not in pool.worker_pids
        assert pool.grade(boxed("7"), "7").correct


def test_items_sent_with_a_lost_item_are_requeued():
    with Grader(num_workers=1, timeout_s=2.0) as pool:
        pool.grade(boxed("1"), "1")
        (pid,) = pool.worker_pids
        # 13 items for one worker go out in batches of 6: the worker dies with 5 unstarted items in its batch
        timer = _after(0.3, lambda: os.kill(pid, signal.SIGKILL))
        items = [(PATHOLOGICAL["factorials"], "5")] + [(boxed(str(i)), str(i)) for i in range(12)]
        results = pool.grade_many(items)
        timer.join()
        assert [r.verdict for r in results] == ["timeout"] + ["correct"] * 12
        assert pool.replaced_workers >= 1 and pid not in pool.worker_pids


def test_a_hung_worker_is_killed_at_the_hard_deadline():
    with Grader(num_workers=1, timeout_s=TIMEOUT_S) as pool:
        pool.grade(boxed("1"), "1")
        (pid,) = pool.worker_pids
        # a stopped process ignores its own alarm: only the parent's hard deadline can end the item
        timer = _after(0.1, lambda: os.kill(pid, signal.SIGSTOP))
        start = time.monotonic()
        result = pool.grade(PATHOLOGICAL["tower"], "5")
        elapsed = time.monotonic() - start
        timer.join()
        assert result.verdict == "timeout"
        assert elapsed <= TIMEOUT_S + 1.0
        assert pid not in pool.worker_pids
        assert pool.grade(boxed("2"), "2").correct


def test_close_stops_the_workers():
    pool = Grader(num_workers=2, timeout_s=TIMEOUT_S)
    pool.grade_many([(boxed("1"), "1"), (boxed("2"), "2")])
    pids = pool.worker_pids
    assert len(pids) == 2
    pool.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(GraderError, match="closed"):
        pool.grade(boxed("1"), "1")


def test_workers_that_cannot_start_raise_a_clear_error():
    # 50 MiB of address space is not enough to import sympy: every worker fails at startup
    with (
        Grader(num_workers=1, timeout_s=TIMEOUT_S, memory_limit_mb=50) as pool,
        pytest.raises(GraderError, match="fail"),
    ):
        pool.grade(boxed("1"), "1")


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        Grader(num_workers=0)
    with Grader(num_workers=1) as pool, pytest.raises(TypeError, match="completion must be a string"):
        pool.grade(None, "1")


def test_the_default_worker_count_shares_the_cpus_between_local_processes(monkeypatch):
    from align.grading import default_grader_workers
    from align.rewards import VerifierReward

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert default_grader_workers() == cpus
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert default_grader_workers() == max(1, cpus // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cpus))  # more processes than CPUs: still one worker each
    assert default_grader_workers() == 1
    assert Grader().num_workers == 1  # nothing started: workers spawn on first use
    reward = VerifierReward()
    assert reward.grader.num_workers == 1
    reward.close()


def test_eval_and_the_online_trainers_share_one_definition_of_the_grading_options():
    import dataclasses

    from trl import TrlParser

    from align.evaluation.config import EvalConfig
    from align.grading import GradingArguments
    from align.trainers.pass_n import GraderGRPOConfig, PassAtNConfig

    shared = {f.name: f.metadata["help"] for f in dataclasses.fields(GradingArguments)}
    assert set(shared) == {"grader_workers", "grading_timeout"}
    for config in (EvalConfig, GraderGRPOConfig, PassAtNConfig):
        fields = {f.name: f for f in dataclasses.fields(config)}
        assert {name: fields[name].metadata["help"] for name in shared} == shared
        assert issubclass(config, GradingArguments)
        text = TrlParser((config,)).format_help()
        assert "--grader_workers" in text and "--grading_timeout" in text
    assert dataclasses.fields(GraderGRPOConfig)[0].name == "output_dir"  # still TrainingArguments' positional
    for bad, message in (({"grader_workers": 0}, "grader_workers must be >= 1"), ({"grading_timeout": 0}, "> 0")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(output_dir="unused", **bad)
        with pytest.raises(ValueError, match=message):
            GraderGRPOConfig("unused", use_cpu=True, bf16=False, **bad)
