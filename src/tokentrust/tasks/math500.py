"""MATH-500 (Lightman et al. 2023): competition problems with LaTeX answers; a test split only."""

from __future__ import annotations

from pathlib import Path

from tokentrust.tasks.base import Example, Task
from tokentrust.tasks.io import load_rows
from tokentrust.verifiers.math import last_boxed, math_equal
from tokentrust.verifiers.numeric import extract_gsm8k_answer

PROMPT = (
    "Solve the following math problem step by step. "
    "Put the final answer within \\boxed{{}}.\n\n{question}"
)


def _validate(row: dict) -> None:
    if not isinstance(row["answer"], str) or not row["answer"].strip():
        raise ValueError("field 'answer' is empty or not a string")


class Math500(Task):
    name = "math500"
    splits = ("test",)

    def __init__(self, data_dir: str | Path | None = None, hub_id: str = "HuggingFaceH4/MATH-500",
                 on_bad_line: str = "raise", answer_fallback: bool = False, format_reward: float = 0.0,
                 timeout_s: float = 2.0):
        super().__init__(format_reward=format_reward, answer_fallback=answer_fallback)
        self.data_dir, self.hub_id, self.on_bad_line, self.timeout_s = data_dir, hub_id, on_bad_line, timeout_s
        self.sources: dict[str, str] = {}

    def _load(self, split: str) -> list[Example]:
        rows, skipped, source = load_rows("math500", split, self.data_dir, self.hub_id, None,
                                          ("problem", "answer"), self.on_bad_line, validate=_validate)
        self.skipped_lines += skipped
        self.sources[split] = source
        return [Example(id=str(r.get("unique_id") or f"math500-{split}-{i:04d}"), question=str(r["problem"]).strip(),
                        answer=r["answer"].strip(), solution=r.get("solution"),
                        meta={k: r[k] for k in ("subject", "level") if k in r})
                for i, r in enumerate(rows)]

    def prompt(self, example: Example) -> str:
        return PROMPT.format(question=example.question)

    def _check(self, completion: str, example: Example) -> tuple[bool, bool, str | None]:
        pred = last_boxed(completion)
        format_ok = pred is not None and pred.strip() != ""
        if not format_ok:
            pred = extract_gsm8k_answer(completion, fallback_last_number=True) if self.answer_fallback else None
        correct = pred is not None and math_equal(example.answer, pred, timeout_s=self.timeout_s)
        return correct, format_ok, pred

    def sft_text(self, example: Example) -> str:
        """The reference solution; its last ``\\boxed{}`` is made to hold the gold answer."""
        sol = (example.solution or "").strip()
        if last_boxed(sol) is not None and last_boxed(sol).strip() == example.answer.strip():
            return sol
        return f"{sol}\n\nThe final answer is $\\boxed{{{example.answer}}}$.".lstrip()
