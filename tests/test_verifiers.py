"""Table-driven tests of the numeric (GSM8K) and math (MATH) verifiers, plus real data rows."""

import json
import threading
from pathlib import Path

import pytest

from tokentrust.verifiers import (
    MathVerifier, answer_format, extract_gsm8k_answer, first_number, last_boxed, math_equal, numbers_equal,
    parse_number,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


# ----------------------------------------------------------------------------- numeric

@pytest.mark.parametrize("text, want", [
    ("#### 1,234", "1234"),
    ("The answer is \\boxed{1,234}.", "1234"),
    ("#### $17", "17"),
    ("#### \\$17", "17"),
    ("#### 17.00", "17"),
    ("#### 17.", "17"),
    ("#### 17 dollars per week", "17"),
    ("#### -5", "-5"),
    ("#### $-5", "-5"),
    ("#### \u22127", "-7"),  # unicode minus sign
    ("#### -0", "0"),
    ("#### 0.50", "0.5"),
    ("#### .5", "0.5"),                               # regression: a bare decimal after ####
    ("#### -.25", "-0.25"),
    ("\\boxed{.5}", "0.5"),
    ("#### 18" + " " * 5000, "18"),                   # regression: trailing padding hid the answer
    ("#### 18" + "\n \t" * 3000, "18"),
    ("#### 1/2", "1/2"),
    ("#### 2/4", "1/2"),
    ("#### **42**", "42"),
    ("####\n17", "17"),
    ("#### 3\nwait, no\n#### 4", "4"),                # the last #### wins
    ("#### 5\nso \\boxed{6}", "5"),                   # #### beats a later \boxed
    ("\\boxed{3} then #### seventeen", "3"),          # a #### with no number falls through to \boxed
    ("\\boxed{\\frac{1}{2}}", "1/2"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("\\boxed{\\$18.90}", "18.9"),
    ("\\boxed{x = 12}", "12"),
    ("\\boxed{2}\n\\boxed{7}", "7"),
    ("\\boxed{}", None),
    ("no answer at all", None),
    ("I think it is 42 apples.", None),              # no format, no fallback
    ("#### \u0661\u0662\u0663", None),              # Arabic-Indic digits do not count
    ("#### \uff11\uff12", None),                     # fullwidth digits do not count
    ("#### " + "9" * 150, None),                     # absurdly long number
])
def test_extract_gsm8k_answer(text, want):
    assert extract_gsm8k_answer(text) == want


@pytest.mark.parametrize("text, want", [
    ("I think it is 42 apples.", "42"),
    ("3 plus 4 is 7.", "7"),
    ("first 1,000 then 2,500.", "2500"),
    ("nothing numeric", None),
    ("#### 9 but 10 later", "9"),  # a formatted answer still wins over the last number
])
def test_extract_fallback_last_number(text, want):
    assert extract_gsm8k_answer(text, fallback_last_number=True) == want


@pytest.mark.parametrize("a, b, want", [
    ("17", "17.0", True), ("17", "17.000", True), ("0.5", "1/2", True), ("1,234", "1234", True),
    ("$17", "17", True), ("-5", "5", False), ("17", "18", False), ("0.1", "1/10", True),
    ("1/3", "0.333333", False),  # exact rationals, no rounding
    (None, "17", False), ("17", None, False), ("abc", "abc", True), ("", "", False), ("abc", "abd", False),
])
def test_numbers_equal(a, b, want):
    assert numbers_equal(a, b) is want
    assert numbers_equal(b, a) is want


@pytest.mark.parametrize("text, want", [
    ("So, the answer is 2 bolts of white fiber.", "2"),
    ("The final answer is: $40,000", "40000"),
    ("The answer is **18**.", "18"),
    ("The ANSWER IS (7)", "7"),
    ("The answer is 3. Wait, no: the answer is 4.", "4"),  # the last phrase wins
    ("#### 5\nThe answer is 6", "5"),  # #### first
    ("\\boxed{9} and the answer is 8", "9"),  # then \boxed
    ("the answer is unclear, 12 maybe", None),
    ("The answer is\n\n\n\n\n\n\n\n\n\n12", None),  # the number must follow on the same line
])
def test_answer_is_phrase(text, want):
    """Small instruct models end with "The answer is N" by habit: the third rule reads it."""
    assert extract_gsm8k_answer(text) == want


def test_parse_number_values():
    from fractions import Fraction
    assert parse_number("1,234.50") == Fraction(246_9, 2)
    assert parse_number("-3") == -3 and parse_number("7/0") == 7  # a zero denominator is ignored
    assert parse_number("12 apples") is None and parse_number("") is None
    assert first_number("17 quills and 3 more") == "17" and first_number("quills") is None


@pytest.mark.parametrize("text, want", [
    ("#### 5", "####"), ("\\boxed{5}", "boxed"), ("5", None), ("#### x", None), ("\\boxed{}", None),
    ("So the answer is 5 apples.", "answer is"), ("the answer is unclear", None),
])
def test_answer_format(text, want):
    assert answer_format(text) == want


# ----------------------------------------------------------------------------- last_boxed

@pytest.mark.parametrize("text, want", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{a} and finally \\boxed{b}", "b"),
    ("\\fbox{3}", "3"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),           # escaped set braces do not nest
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{}", ""),
    ("\\boxed{2} then \\boxed{unbalanced", None),  # a truncated last answer is no answer
    ("no box", None),
    ("\\boxed{" + "{" * 100 + "1" + "}" * 101, None),  # deeper than the depth cap
    ("\\boxed{" + "x" * 5000 + "}", None),               # longer than the length cap
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


# ----------------------------------------------------------------------------- math_equal

EQUIVALENT = [
    ("\\frac{14}{3}", "\\dfrac{14}{3}"),
    ("0.5", "\\frac12"),
    ("\\frac{1}{2}", "1/2"),
    ("(1,2)", "(1, 2)"),
    ("(1,2]", "(1,2]"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("x^2+1", "1+x^2"),
    ("3\\sqrt{13}", "\\sqrt{117}"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("90^\\circ", "90"),
    ("2", "\\sqrt{4}"),
    ("1000", "10^3"),
    ("\\text{(C)}", "C"),
]
NOT_EQUIVALENT = [
    ("\\frac{14}{3}", "\\frac{3}{14}"),
    ("0.5", "0.6"),
    ("(1,2)", "[1,2]"),      # open vs closed interval
    ("(1,2)", "(2,1)"),      # ordered tuples
    ("\\sqrt{2}", "1.41"),
    ("x^2+1", "x^2-1"),
    ("10^{100}", "10^{100}+1"),
    ("10", "9"),
    ("5", ""),
    ("", "5"),
]


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier()
    assert v.warmup()
    yield v
    v.close()


@pytest.mark.parametrize("gold, pred", EQUIVALENT)
def test_math_equal_equivalent(verifier, gold, pred):
    assert verifier.equal(gold, pred) is True


@pytest.mark.parametrize("gold, pred", NOT_EQUIVALENT)
def test_math_equal_not_equivalent(verifier, gold, pred):
    assert verifier.equal(gold, pred) is False


def test_fast_path_never_starts_a_worker():
    v = MathVerifier()
    try:
        assert v.equal("\\dfrac{1}{2}", "\\frac{1}{2}") is True            # normalised strings
        assert v.equal("\\left(1,2\\right)", "(1, 2)") is True
        assert v.equal("17", "17.0") is True and v.equal("17", "18") is False  # plain numbers
        assert v.equal("1" * 1001, "1" * 1001) is False                     # length cap
        assert v.equal("  ", "1") is False
        assert v.pids() == []
    finally:
        v.close()


def test_math_equal_off_the_main_thread():
    """math-verify's own timeout is main-thread only; ours works from any thread."""
    out = {}

    def run():
        out["eq"] = math_equal("0.5", "\\frac12")
        out["ne"] = math_equal("\\frac{14}{3}", "\\frac{3}{14}")

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out == {"eq": True, "ne": False}


def test_math_equal_concurrent_threads(verifier):
    cases = EQUIVALENT[:6] + NOT_EQUIVALENT[:6]
    want = [True] * 6 + [False] * 6
    results: dict[int, list[bool]] = {}

    def run(k):
        results[k] = [verifier.equal(g, p) for g, p in cases]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {k: want for k in range(4)}


# ----------------------------------------------------------------------------- real rows

def _rows(path: Path, n: int) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_real_gsm8k_rows():
    for row in _rows(DATA / "gsm8k" / "test.jsonl", 50):
        gold = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_gsm8k_answer(row["answer"]) == gold
        assert numbers_equal(extract_gsm8k_answer(row["answer"] + "\n"), gold)
        assert not numbers_equal(str(int(gold) + 1), gold)


def test_real_math500_rows(verifier):
    rows = _rows(DATA / "math500" / "test.jsonl", 25)
    for row in rows:
        assert last_boxed(row["solution"]) == row["answer"]
        assert verifier.equal(row["answer"], last_boxed(row["solution"]))
    # each answer against the next row's answer: different values, except rows 23/24 ("5", "x=5"),
    # which math-verify deliberately equates (an assignment's right-hand side is its value)
    pairs = list(zip(rows, rows[1:]))
    assert [b["answer"] for a, b in pairs if verifier.equal(a["answer"], b["answer"])] == ["x=5"]
    assert rows[22]["answer"] == "5" and rows[23]["answer"] == "x=5"
    # the first row: polar coordinates written differently
    assert rows[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert verifier.equal(rows[0]["answer"], "(3, \\pi/2)")
    assert not verifier.equal(rows[0]["answer"], "(3, \\pi)")
