"""GSM8K (Cobbe et al. 2021): grade-school word problems, gold number after ``#### ``."""

from __future__ import annotations

import re
from pathlib import Path

from tokentrust.tasks.base import Example, Task
from tokentrust.tasks.io import load_rows
from tokentrust.verifiers.numeric import answer_format, extract_gsm8k_answer, numbers_equal, parse_number

# The phrase SmolLM2-135M-Instruct writes by itself. Asked for "#### N" it wrote no "#### <number>" in
# 16 test problems (3 copied "#### N" literally; 7 ended "the answer is <number>" anyway); asked for this
# sentence, 14 of 16 ended with it (docs/results/smollm2-baseline). "#### N" and \\boxed{} still win.
PROMPT = '{question}\nSolve it step by step. Finish with the sentence "The answer is N." where N is the final number.'
_CALC = re.compile(r"<<[^<>]*>>")


def gold_from_solution(solution: str) -> str:
    """The gold number of a GSM8K solution: the text after the last ``####``, commas stripped."""
    if not isinstance(solution, str) or "####" not in solution:
        raise ValueError("field 'answer' has no '#### N' final line")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if parse_number(gold) is None:
        raise ValueError(f"field 'answer' has a non-numeric gold {gold[:40]!r}")
    return gold


class GSM8K(Task):
    name = "gsm8k"
    splits = ("train", "test")

    def __init__(self, data_dir: str | Path | None = None, hub_id: str = "openai/gsm8k", hub_config: str = "main",
                 on_bad_line: str = "raise", answer_fallback: bool = False, format_reward: float = 0.0):
        super().__init__(format_reward=format_reward, answer_fallback=answer_fallback)
        self.data_dir, self.hub_id, self.hub_config, self.on_bad_line = data_dir, hub_id, hub_config, on_bad_line
        self.sources: dict[str, str] = {}  # split -> file path or hub id it was read from

    def _load(self, split: str) -> list[Example]:
        rows, skipped, source = load_rows(
            "gsm8k", split, self.data_dir, self.hub_id, self.hub_config, ("question", "answer"), self.on_bad_line,
            validate=lambda r: gold_from_solution(r["answer"]),
        )
        self.skipped_lines += skipped
        self.sources[split] = source
        return [Example(id=f"gsm8k-{split}-{i:05d}", question=str(r["question"]).strip(),
                        answer=gold_from_solution(r["answer"]), solution=r["answer"])
                for i, r in enumerate(rows)]

    def prompt(self, example: Example) -> str:
        return PROMPT.format(question=example.question)

    def _check(self, completion: str, example: Example) -> tuple[bool, bool, str | None]:
        pred = extract_gsm8k_answer(completion, fallback_last_number=self.answer_fallback)
        return numbers_equal(pred, example.answer), answer_format(completion) is not None, pred

    def sft_text(self, example: Example) -> str:
        """The gold solution without ``<<calc>>`` annotations, ending with ``#### N``."""
        body = (example.solution or "").rsplit("####", 1)[0]
        body = _CALC.sub("", body).strip()
        return f"{body}\n#### {example.answer}" if body else f"#### {example.answer}"
