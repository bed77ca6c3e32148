"""GSM8K-style numeric answers: extract the final number from a completion and compare exactly.

Rules (see docs/tasks.md): the number after the LAST ``####`` wins; if that marker has no number
after it, or there is none, the last ``\\boxed{...}``; then the number after the last "answer is"
("The answer is 18.", "the final answer is: $18", the phrase small instruct models write on their
own); then, only when asked, the last number in the text. Commas, ``$``, a leading ``+``, trailing
words/units and a trailing period are dropped; numbers compare as exact rationals (``17.0 == 17``,
``0.5 == 1/2``). Only ASCII digits count. Only the last `TAIL_CHARS` characters are scanned and
every pattern is linear, so megabyte inputs are cheap.
"""

from __future__ import annotations

import re
from fractions import Fraction

from tokentrust.verifiers.math import last_boxed

TAIL_CHARS = 4096
MAX_DIGITS = 100  # a "number" with more digits than this is not an answer

# sign, optional $, digits with proper thousands commas or plain digits, decimals, /denominator
_SIGN = r"(?P<s1>[-+\u2212]?)[ \t]?\\?\$?[ \t]?(?P<s2>[-\u2212]?)"
_REST = r"(?P<dec>\.[0-9]+)?(?:[ \t]?/[ \t]?(?P<den>[0-9]+))?"
_NUM = _SIGN + r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)" + _REST
# after "####" or inside \boxed{} a bare decimal such as ".5" is an answer too (int part empty);
# in running text a leading dot is too often punctuation ("...5") to read it that way
_NUM_LEAD = _SIGN + r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+|(?=\.[0-9]))" + _REST
_NUM_RE = re.compile(_NUM)
_NUM_LEAD_RE = re.compile(_NUM_LEAD)
_AFTER_HASH_RE = re.compile(r"\s{0,8}[*_`(\[{]{0,4}[ \t]*" + _NUM_LEAD)
_AFTER_PHRASE_RE = re.compile(r"[ \t]{0,4}:?[ \t]{0,4}[*_`(\[{]{0,4}[ \t]*" + _NUM_LEAD)
ANSWER_PHRASE = "answer is"
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[0-9]+)\s*\}\s*\{\s*([0-9]+)\s*\}|\\[dt]?frac([0-9])([0-9])")


def answer_tail(text: str) -> str:
    """The last `TAIL_CHARS` characters of `text` after trailing whitespace is dropped, so padding
    after the answer (a model that emits spaces until max_new_tokens) cannot push it out of view."""
    return text.rstrip()[-TAIL_CHARS:]


def _canonical(m: re.Match) -> str | None:
    digits = m.group("int").replace(",", "")
    dec = m.group("dec") or ""
    if len(digits) + len(dec) > MAX_DIGITS:
        return None
    neg = "-" if "-" in (m.group("s1") + m.group("s2")).replace("\u2212", "-") else ""
    value = Fraction(digits + dec)
    den = m.group("den")
    if den is not None and len(den) <= MAX_DIGITS and int(den) != 0:
        value /= int(den)
    if value == 0:
        neg = ""
    if value.denominator == 1:
        return f"{neg}{value.numerator}"
    if den is None:  # a decimal: keep it decimal, without trailing zeros
        return f"{neg}{digits.lstrip('0') or '0'}{dec.rstrip('0')}"
    return f"{neg}{value.numerator}/{value.denominator}"


def _number_in_boxed(content: str) -> str | None:
    content = _FRAC_RE.sub(lambda m: f"{m.group(1) or m.group(3)}/{m.group(2) or m.group(4)}", content)
    content = content.replace("{,}", "").replace("\\!", "")
    m = _NUM_LEAD_RE.search(content)
    return _canonical(m) if m else None


def extract_gsm8k_answer(text: str, fallback_last_number: bool = False) -> str | None:
    """The final numeric answer of `text` as a canonical string ("17", "-3", "0.5", "1/2"), or None."""
    if not isinstance(text, str):
        return None
    tail = answer_tail(text)
    idx = tail.rfind("####")
    if idx >= 0:
        m = _AFTER_HASH_RE.match(tail, idx + 4)
        if m:
            ans = _canonical(m)
            if ans is not None:
                return ans
    boxed = last_boxed(tail)
    if boxed is not None:
        ans = _number_in_boxed(boxed)
        if ans is not None:
            return ans
    ans = _after_phrase(tail)
    if ans is not None:
        return ans
    if fallback_last_number:
        last = None
        for last in _NUM_RE.finditer(tail):
            pass
        if last is not None:
            return _canonical(last)
    return None


def _after_phrase(tail: str) -> str | None:
    """The number right after the last "answer is" (any case, optional colon, $, ** or ( before it)."""
    idx = tail.lower().rfind(ANSWER_PHRASE)
    if idx < 0:
        return None
    m = _AFTER_PHRASE_RE.match(tail, idx + len(ANSWER_PHRASE))
    return _canonical(m) if m else None


def first_number(text: str) -> str | None:
    """The first number in `text` (scanning at most `TAIL_CHARS` characters), canonical, or None."""
    if not isinstance(text, str):
        return None
    m = _NUM_RE.search(text[:TAIL_CHARS])
    return _canonical(m) if m else None


def answer_format(text: str) -> str | None:
    """Which answer format `text` used: "####", "boxed" or "answer is" (with a number), else None."""
    if not isinstance(text, str):
        return None
    tail = answer_tail(text)
    idx = tail.rfind("####")
    if idx >= 0 and (m := _AFTER_HASH_RE.match(tail, idx + 4)) and _canonical(m) is not None:
        return "####"
    boxed = last_boxed(tail)
    if boxed is not None and _number_in_boxed(boxed) is not None:
        return "boxed"
    if _after_phrase(tail) is not None:
        return "answer is"
    return None


def parse_number(s: str | None) -> Fraction | None:
    """Exact value of a number string such as "1,234", "$17", "-3", "17.00", "1/2"; else None."""
    if not isinstance(s, str) or len(s) > 2 * MAX_DIGITS + 8:
        return None
    m = _NUM_RE.fullmatch(s.strip().rstrip("."))
    if m is None:
        return None
    c = _canonical(m)
    return Fraction(c) if c is not None else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact rational equality when both parse as numbers, else equality of stripped non-empty strings."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    fa, fb = parse_number(a), parse_number(b)
    if fa is not None and fb is not None:
        return fa == fb
    a, b = a.strip(), b.strip()
    return bool(a) and a == b
