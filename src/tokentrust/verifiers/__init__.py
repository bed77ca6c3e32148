"""Answer verifiers: GSM8K-style numbers (`numeric`) and MATH-style LaTeX (`math`).

Every public function here returns a value for any input (None/False on garbage), never
evaluates its input, and is bounded in time: see docs/tasks.md for the rules and guarantees.
"""

from tokentrust.verifiers.failures import VerifierFailures, count_failures
from tokentrust.verifiers.math import MathVerifier, close, default_verifier, last_boxed, math_equal, normalize_answer
from tokentrust.verifiers.numeric import answer_format, extract_gsm8k_answer, first_number, numbers_equal, parse_number

__all__ = [
    "MathVerifier", "VerifierFailures", "answer_format", "close", "count_failures", "default_verifier",
    "extract_gsm8k_answer", "first_number", "last_boxed", "math_equal", "normalize_answer", "numbers_equal",
    "parse_number",
]
