"""The task interface: examples, prompt templates, scoring, SFT texts and corpus texts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Example:
    """One problem: `answer` is the gold the verifier compares against; `solution` a worked solution."""

    id: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """A verifier's verdict on one completion. `pred` is the extracted answer (None if none)."""

    reward: float
    correct: bool
    format_ok: bool
    pred: str | None


class Task(ABC):
    """A dataset plus its prompt template and verifier.

    reward = 1.0 if correct else 0.0, plus `format_reward` when the answer format was followed
    (so a correct, well-formatted answer gets 1 + format_reward). `answer_fallback` lets the
    verifier read an unformatted answer (e.g. the last number); such answers are never format_ok.
    """

    name: str = ""
    splits: tuple[str, ...] | None = ("train", "test")  # None: any split name

    def __init__(self, format_reward: float = 0.0, answer_fallback: bool = False):
        if not format_reward >= 0.0:
            raise ValueError(f"format_reward must be >= 0, got {format_reward}")
        self.format_reward = float(format_reward)
        self.answer_fallback = bool(answer_fallback)
        self.skipped_lines = 0  # malformed lines skipped while loading (on_bad_line="skip")
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        """All examples of `split` (loaded once, then cached)."""
        if self.splits is not None and split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; available: {', '.join(self.splits)}")
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]

    def chat(self, example: Example) -> list[dict]:
        """The prompt as chat messages, for tokenizers with a chat template."""
        return [{"role": "user", "content": self.prompt(example)}]

    def score(self, completion: str, example: Example) -> Score:
        """Verify one completion. Never raises on the completion's content."""
        if not isinstance(completion, str):
            return Score(0.0, False, False, None)
        correct, format_ok, pred = self._check(completion, example)
        reward = (1.0 if correct else 0.0) + (self.format_reward if format_ok else 0.0)
        return Score(reward, bool(correct), bool(format_ok), pred)

    def corpus_texts(self, split: str = "train") -> Iterator[str]:
        """Question + worked solution per example, for frequency tables and tokenizer training."""
        for ex in self.examples(split):
            yield ex.question + "\n" + self.sft_text(ex)

    @abstractmethod
    def _load(self, split: str) -> list[Example]: ...

    @abstractmethod
    def prompt(self, example: Example) -> str:
        """The user message: instructions + question."""

    @abstractmethod
    def _check(self, completion: str, example: Example) -> tuple[bool, bool, str | None]:
        """(correct, format_ok, pred) for one completion."""

    def answer_class(self, gold: str) -> str | None:
        """"rare" or "common" for tasks whose answers need a word of graded frequency (the gold answer
        string in, as problems.jsonl stores it); None where the task has no such notion."""
        return None

    @abstractmethod
    def sft_text(self, example: Example) -> str:
        """A worked solution in exactly the answer format the verifier expects."""
