"""Adversarial inputs: verifiers never raise, never execute input, stay time-bounded, leave no process."""

import multiprocessing
import os
import signal
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentrust.tasks import Example, Score, get_task
from tokentrust.verifiers import MathVerifier, extract_gsm8k_answer, last_boxed, numbers_equal

BOUND_S = 2.0     # every check must return within this
TIMEOUT_S = 1.0   # the math-verify deadline used here (the default is 2 s)


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier()
    assert v.warmup()
    yield v
    v.close()


def timed(fn, *args):
    t = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t


SENTINEL_CMD = "__import__('os').system('touch {p}')"

MB = 1 << 20
HUGE = [
    "1" * MB,
    "{" * MB,
    "\\boxed{" * (MB // 7),
    "#### " + " " * MB + "x",
    "####" * (MB // 4),
    "\\boxed{" + "{" * MB,
    ("1," * (MB // 2)) + "#### 5",
    "9" * MB + "\n#### 12",
    "\\frac{" * (MB // 6),
    "$" * MB,
]
LATEX = [  # (gold, pred): all must be False (or True where noted) in bounded time
    ("10^{10^{10}}", "10^{10^{11}}"),
    ("9^{9^{9^{9}}}", "9^{9^{9^{9}}}+1"),
    ("9^{9^{9}}", "1"),
    ("1", "9^{9^{9}}"),
    ("2^{2^{30}}", "3"),
    ("1", "{" * 10_000 + "1" + "}" * 10_000),      # 10k nesting levels (over the length cap)
    ("1", "{" * 450 + "1" + "}" * 450),            # deep but under the cap: reaches sympy
    ("1", "\\frac" * 190),
    ("\\frac{1}{2}", "\\frac{1}{2"),                # unbalanced
    ("\\sqrt{2}", "\\sqrt{2}}}}"),
    ("\\left( 1, 2", "(1,2)"),
    ("5", "5\x00"),
    ("5", "\x01\x02\x1b[31m5"),
    ("123", "\u0661\u0662\u0663"),                  # Arabic-Indic digits
    ("12", "\uff11\uff12"),                         # fullwidth digits
    ("x", "\\begin{matrix}" * 100),
    ("1", "\\int_0^\\infty e^{-x^{x^{x}}} dx"),
    ("1", "\\sum_{n=1}^{10^{10}} n"),
    ("1", "\\prod_{k=1}^{10^{9}} k"),
    ("1", "10^{-10^{10}}"),
    ("0", "(10^{10^{10}})!"),
]


def test_huge_strings_are_cheap(verifier):
    for s in HUGE:
        for fn, args in ((extract_gsm8k_answer, (s,)), (extract_gsm8k_answer, (s, True)), (last_boxed, (s,)),
                         (verifier.equal, ("1", s)), (verifier.equal, (s, s))):
            out, dt = timed(fn, *args)
            assert dt < 0.5, (fn.__name__, s[:20], dt)
            assert out is None or isinstance(out, (str, bool))
    assert extract_gsm8k_answer("9" * MB + "\n#### 12") == "12"
    assert extract_gsm8k_answer(("1," * (MB // 2)) + "#### 5") == "5"


@pytest.mark.parametrize("gold, pred", LATEX)
def test_adversarial_latex_bounded(verifier, gold, pred):
    out, dt = timed(verifier.equal, gold, pred, TIMEOUT_S)
    assert out is False
    assert dt < BOUND_S, dt
    out, dt = timed(verifier.equal, pred, gold, TIMEOUT_S)  # gold and pred swapped
    assert isinstance(out, bool) and dt < BOUND_S


def test_default_timeout_bound(verifier):
    out, dt = timed(verifier.equal, "10^{10^{10}}", "10^{10^{11}}")  # default timeout_s=2.0
    assert out is False and dt < 2.0 + 0.25


def test_code_in_answers_is_never_executed(tmp_path, verifier):
    sentinel = tmp_path / "pwned"
    payloads = [SENTINEL_CMD.format(p=sentinel), "eval(\"" + SENTINEL_CMD.format(p=sentinel) + "\")",
                "exec('import os; os.system(\"touch " + str(sentinel) + "\")')"]
    math500 = get_task("math500")
    gsm, arith = get_task("gsm8k", answer_fallback=True), get_task("arith", answer_fallback=True)
    ex = Example("x", "q", "5", meta={})
    for p in payloads:
        for text in (p, f"\\boxed{{{p}}}", f"#### {p}", f"$ {p} $"):
            assert verifier.equal(p, "5") is False and verifier.equal("5", p) is False
            assert verifier.equal(p, p) is True  # identical strings: fast path, no parsing at all
            extract_gsm8k_answer(text, True)
            for task in (math500, gsm, arith):
                assert isinstance(task.score(text, ex), Score)
    assert not sentinel.exists()


def test_hung_worker_is_killed_and_replaced():
    """A worker stuck in C code (simulated with SIGSTOP) is killed at the deadline and replaced."""
    v = MathVerifier()
    try:
        assert v.warmup()
        stuck = v.pids()
        for pid in stuck:
            os.kill(pid, signal.SIGSTOP)
        for _ in stuck:
            out, dt = timed(v.equal, "0.5", "\\frac12", 0.5)
            assert out is False and 0.45 < dt < 1.5
        assert v.timeouts == len(stuck)
        assert not set(stuck) & set(v.pids())
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in stuck)
        assert v.equal("0.5", "\\frac12", 30.0) is True  # the replacements work (start-up included)
    finally:
        v.close()


def test_dead_worker_is_replaced():
    v = MathVerifier(num_workers=1)
    try:
        assert v.warmup()
        (pid,) = v.pids()
        os.kill(pid, signal.SIGKILL)
        assert v.equal("0.5", "\\frac12", 1.0) is False  # the check that found it dead
        assert v.equal("0.5", "\\frac12", 30.0) is True
        assert pid not in v.pids()
    finally:
        v.close()


def test_close_leaves_no_child_process():
    v = MathVerifier()
    assert v.warmup()
    assert v.equal("0.5", "\\frac12") is True
    pids = v.pids()
    assert len(pids) == 2 and set(pids) <= {c.pid for c in psutil.Process().children()}
    v.close()
    children = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not set(pids) & children
    assert not any(psutil.pid_exists(p) for p in pids)
    assert multiprocessing.active_children() == []
    assert v.equal("0.5", "\\frac12") is False and v.equal("0.5", "0.50") is True  # closed: fast path only
    assert v.pids() == []


# ----------------------------------------------------------------------------- properties

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300) | st.text(
    alphabet="0123456789#$,.-/ {}\\boxedfrac^_()[]x=\n", max_size=200)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(TEXT, st.booleans())
def test_numeric_never_raises(text, fallback):
    out = extract_gsm8k_answer(text, fallback)
    assert out is None or (isinstance(out, str) and numbers_equal(out, out))
    assert isinstance(numbers_equal(text, out), bool)
    box = last_boxed(text)
    assert box is None or (isinstance(box, str) and box in text)


@SETTINGS
@given(TEXT, st.sampled_from(["gsm8k", "arith"]))
def test_scores_never_raise(text, name):
    task = get_task(name, answer_fallback=True, format_reward=0.1)
    s = task.score(text, Example("x", "q", "17 quills" if name == "arith" else "17"))
    assert isinstance(s, Score) and isinstance(s.correct, bool) and isinstance(s.format_ok, bool)
    assert s.reward == pytest.approx(float(s.correct) + 0.1 * s.format_ok)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT, TEXT)
def test_math_equal_never_raises(verifier, gold, pred):
    out, dt = timed(verifier.equal, gold, pred, TIMEOUT_S)
    assert isinstance(out, bool) and dt < BOUND_S


def test_failed_checks_are_counted_by_kind():
    """A stopped worker (the deadline passes) is a timeout, a killed one an error: both score False,
    and count_failures sees them in the thread that ran the checks; a verdict adds nothing."""
    from tokentrust.verifiers import count_failures

    v = MathVerifier(num_workers=1)
    try:
        assert v.warmup()
        os.kill(v.pids()[0], signal.SIGSTOP)
        with count_failures() as stopped:
            assert v.equal("0.5", "\\frac12", 0.5) is False
        assert v.warmup()
        os.kill(v.pids()[0], signal.SIGKILL)
        with count_failures() as killed:
            assert v.equal("0.5", "\\frac12", 5.0) is False
        with count_failures() as fine:
            assert v.equal("0.5", "\\frac12", 30.0) is True
    finally:
        v.close()
    assert (stopped.timeouts, stopped.errors) == (1, 0)
    assert (killed.timeouts, killed.errors) == (0, 1)
    assert (fine.timeouts, fine.errors) == (0, 0)
    assert (v.timeouts, v.errors) == (1, 1)
