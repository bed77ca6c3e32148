"""reasoning-gym tasks (``task.name: rg/<dataset>``): procedural problems scored by the dataset's own
``score_answer``, bounded in time. Needs the ``rg`` extra (``pip install 'tokentrust[rg]'``).

    task = get_task("rg/countdown", seed=0, num_train=2000, num_test=200, min_numbers=3)

Options other than tokentrust's (``seed``, ``num_train``, ``num_test``, ``format_reward``,
``answer_fallback``, ``timeout_s``) go to ``reasoning_gym.create_dataset`` unchanged. The train split
is generated with ``seed``, the test split with another seed, minus any question the train split
already has. The answer goes between ``<answer>`` tags (reasoning-gym's convention); the reward is
``score_answer(pred, entry)`` (partial credit as the dataset defines it) plus ``format_reward`` when
the tags were used; ``correct`` means a score of 1.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from tokentrust.tasks.base import Example, Score, Task
from tokentrust.verifiers.failures import record_failure
from tokentrust.verifiers.math import _Worker

PROMPT = "Solve the following problem. Give only the final answer between <answer> and </answer>.\n\n{question}"
_ANSWER = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
MAX_COMPLETION_CHARS = 20_000  # only the tail is searched for the answer tags
TEST_SEED_OFFSET = 1_000_003


def extract_answer(completion: str, fallback_last_line: bool = False) -> str | None:
    """The last ``<answer>...</answer>`` content (stripped); else, with the fallback, the last non-empty line."""
    tail = completion[-MAX_COMPLETION_CHARS:]
    hits = _ANSWER.findall(tail)
    if hits:
        return hits[-1].strip()
    if fallback_last_line:
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        return lines[-1] if lines else None
    return None


class _ScoreWorker(_Worker):
    """One `_rg_worker.py` subprocess (the pipe handling and requests of math-verify's worker)."""

    script = str(Path(__file__).with_name("_rg_worker.py"))


class BoundedScorer:
    """``score_answer`` in a subprocess with a deadline per call; a late or dead worker is replaced.

    Thread-safe (one call at a time); a fork gets its own worker.
    """

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 120.0, memory_mb: int = 3072):
        self.timeout_s, self.startup_timeout_s, self.memory_mb = timeout_s, startup_timeout_s, memory_mb
        self._worker: _ScoreWorker | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.timeouts = 0  # calls that ran out of time (the worker's timer, or the deadline: then replaced)
        self.errors = 0  # calls whose worker died, answered garbage or did not start (replaced)
        atexit.register(self.close)

    def score(self, request: dict[str, Any]) -> float:
        with self._lock:
            if self._worker is None or self._pid != os.getpid():
                self._worker, self._pid = _ScoreWorker(self.memory_mb), os.getpid()
            w = self._worker
            msg = None
            if w.wait_ready(time.monotonic() + self.startup_timeout_s):
                msg = w.request(request, time.monotonic() + self.timeout_s)
            if msg is None:  # deadline, crash or failed start
                record_failure(w.failure, self)
                w.kill()
                self._worker = None
                return 0.0
        if msg.get("timeout"):  # the worker's own timer fired: 0, and the worker lives on
            record_failure("timeouts", self)
        if msg.get("mismatch"):
            raise RuntimeError(f"reasoning-gym dataset {request['dataset']!r} regenerated a different problem "
                               f"at index {request['index']}; its generator is not deterministic")
        return float(msg["score"])

    def close(self) -> None:
        with self._lock:
            if self._worker is not None and self._pid == os.getpid():
                self._worker.kill()
            self._worker = None


class ReasoningGym(Task):
    """A reasoning-gym dataset as a tokentrust task (see the module docstring)."""

    splits = ("train", "test")

    def __init__(self, dataset: str, seed: int = 0, num_train: int = 2000, num_test: int = 200,
                 format_reward: float = 0.0, answer_fallback: bool = False, timeout_s: float = 5.0,
                 **dataset_options: Any):
        super().__init__(format_reward=format_reward, answer_fallback=answer_fallback)
        try:
            import reasoning_gym
        except ImportError:
            raise ImportError(f"task 'rg/{dataset}' needs reasoning-gym: pip install 'tokentrust[rg]'") from None
        if dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"task.name: unknown reasoning-gym dataset {dataset!r}; available: "
                             f"{', '.join(sorted(reasoning_gym.factory.DATASETS))}")
        for knob, value in (("num_train", num_train), ("num_test", num_test)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"task.options.{knob} must be an integer >= 1, got {value!r}")
        self.name = f"rg/{dataset}"
        self.dataset, self.seed, self.options = dataset, int(seed), dict(dataset_options)
        self.sizes = {"train": num_train, "test": num_test}
        self.scorer = BoundedScorer(timeout_s=timeout_s)
        self._generate("train", 1)  # unknown or bad dataset options fail now, naming the option

    def _generate(self, split: str, size: int):
        import reasoning_gym

        seed = self.seed + (TEST_SEED_OFFSET if split == "test" else 0)
        try:
            return reasoning_gym.create_dataset(self.dataset, seed=seed, size=size, **self.options), seed
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"task.options for {self.name}: {' '.join(str(e).split())}") from None

    def _load(self, split: str) -> list[Example]:
        ds, seed = self._generate(split, self.sizes[split])
        seen = {ex.question for ex in self.examples("train")} if split == "test" else set()
        out = []
        for i in range(self.sizes[split]):
            entry = ds[i]
            if entry["question"] in seen:
                continue  # the test split never repeats a training question
            out.append(Example(id=f"{self.name}-{split}-{i:05d}", question=entry["question"],
                               answer=str(entry["answer"]),
                               meta={"split": split, "index": i, "seed": seed, "size": self.sizes[split]}))
        return out

    def prompt(self, example: Example) -> str:
        return PROMPT.format(question=example.question)

    def sft_text(self, example: Example) -> str:
        return f"<answer>{example.answer}</answer>"

    def score(self, completion: str, example: Example) -> Score:
        """reasoning-gym's ``score_answer`` of the extracted answer (time-bounded; 0 on a timeout)."""
        if not isinstance(completion, str):
            return Score(0.0, False, False, None)
        pred = extract_answer(completion, fallback_last_line=self.answer_fallback)
        format_ok = extract_answer(completion) is not None
        value = self.score_pred(pred, example)
        return Score(value + (self.format_reward if format_ok else 0.0), value >= 1.0, format_ok, pred)

    def score_pred(self, pred: str | None, example: Example) -> float:
        """``score_answer(pred, entry)`` for the entry ``example`` came from (``example.meta``)."""
        meta = example.meta
        if not all(k in meta for k in ("index", "seed", "size")):
            raise ValueError(f"{self.name}: example {example.id!r} has no reasoning-gym index/seed/size in its meta")
        return self.scorer.score({"dataset": self.dataset, "options": self.options, "seed": meta["seed"],
                                  "size": meta["size"], "index": meta["index"], "question": example.question,
                                  "answer": pred})

    def _check(self, completion: str, example: Example) -> tuple[bool, bool, str | None]:
        s = self.score(completion, example)
        return s.correct, s.format_ok, s.pred
