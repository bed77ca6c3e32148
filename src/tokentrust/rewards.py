"""tokentrust tasks as the engines' reward functions, with the tasks' own bounded verifiers.

TRL (``GRPOTrainer(reward_funcs=...)``)::

    task = get_task("gsm8k", answer_fallback=True)
    dataset = Dataset.from_list(task_rows(task, "train"))       # prompt, answer, question, example_meta
    trainer = GRPOTrainer(..., reward_funcs=trl_reward(task), train_dataset=dataset)

verl (``reward.custom_reward_function.path=pkg://tokentrust.rewards``, ``name=compute_score``), with
parquet rows from ``verl_rows(task, split)``: ``data_source`` ``tokentrust/<task name>``,
``reward_model.ground_truth`` the gold answer, ``extra_info`` the question, the example's meta and
the task options (JSON). The score is the task's reward (``reward = correct + format_reward`` or,
for ``rg/*``, reasoning-gym's ``score_answer``); ``acc`` and ``format_ok`` go to verl's metrics.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from tokentrust.tasks import Example, Task, get_task

DATA_SOURCE_PREFIX = "tokentrust/"
# other engines' names for the same data (verl's own preprocessing scripts)
DATA_SOURCE_ALIASES = {"openai/gsm8k": "gsm8k", "HuggingFaceH4/MATH-500": "math500"}


def task_rows(task: Task, split: str = "train", limit: int | None = None, *, chat: bool = True) -> list[dict[str, Any]]:
    """One row per example: ``prompt`` (chat messages, or the prompt text with ``chat=False``),
    ``answer`` (gold), ``question``, ``example_id`` and ``example_meta`` (JSON) for the reward."""
    examples = task.examples(split)[:limit] if limit else task.examples(split)
    return [{"prompt": task.chat(ex) if chat else task.prompt(ex), "answer": ex.answer, "question": ex.question,
             "example_id": ex.id, "example_meta": json.dumps(ex.meta, sort_keys=True)} for ex in examples]


def verl_rows(task: Task, split: str = "train", options: dict[str, Any] | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
    """Rows in verl's RL parquet layout, scored by ``compute_score``; ``options`` are the task's
    constructor options (needed again at scoring time, e.g. ``answer_fallback`` or rg dataset options)."""
    return [{"data_source": DATA_SOURCE_PREFIX + task.name, "prompt": row["prompt"], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": row["answer"]},
             "extra_info": {"split": split, "index": i, "question": row["question"], "example_id": row["example_id"],
                            "example_meta": row["example_meta"], "task_options": json.dumps(options or {},
                                                                                             sort_keys=True)}}
            for i, row in enumerate(task_rows(task, split, limit))]


def _example(answer: Any, question: Any = "", meta: Any = None, example_id: Any = "") -> Example:
    if isinstance(meta, str):
        meta = json.loads(meta) if meta else {}
    return Example(id=str(example_id or ""), question=str(question or ""), answer=str(answer), meta=dict(meta or {}))


def _text(completion: Any) -> str:
    """A TRL completion: a string, or conversational messages (the last message's content)."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return completion if isinstance(completion, str) else ""


class TaskReward:
    """A task's verifier as a TRL reward function: ``f(prompts, completions, answer, **columns)``.

    Needs the dataset column ``answer`` (gold); ``question`` and ``example_meta`` when the task needs
    them (``rg/*``). Returns the task's reward per completion.
    """

    def __init__(self, task: Task):
        self.task = task
        self.__name__ = f"tokentrust_{task.name.replace('/', '_')}"  # TRL logs rewards/<__name__>

    def __call__(self, prompts: list[Any] | None = None, completions: list[Any] | None = None,
                 answer: list[Any] | None = None, question: list[Any] | None = None,
                 example_meta: list[Any] | None = None, **kwargs: Any) -> list[float]:
        if completions is None or answer is None:
            raise ValueError(f"{self.__name__}: needs completions and the dataset column 'answer' (see task_rows)")
        n = len(completions)
        question, example_meta = question or [""] * n, example_meta or [None] * n
        return [self.task.score(_text(c), _example(a, q, m)).reward
                for c, a, q, m in zip(completions, answer, question, example_meta)]


def trl_reward(task: str | Task, **options: Any) -> TaskReward:
    """A TRL ``reward_funcs`` entry for a task (a name plus its options, or a built task)."""
    return TaskReward(get_task(task, **options) if isinstance(task, str) else task)


_TASKS: dict[tuple[str, str], Task] = {}
_TASKS_LOCK = threading.Lock()


def task_for(data_source: str, options: dict[str, Any] | str | None = None) -> Task:
    """The task a verl ``data_source`` names (``tokentrust/<task>``, ``<task>``, ``rg/<dataset>`` or an
    alias such as ``openai/gsm8k``), built once per (name, options) and process."""
    if isinstance(options, str):
        options = json.loads(options) if options else {}
    name = data_source[len(DATA_SOURCE_PREFIX):] if data_source.startswith(DATA_SOURCE_PREFIX) else data_source
    name = DATA_SOURCE_ALIASES.get(name, name)
    key = (name, json.dumps(options or {}, sort_keys=True))
    with _TASKS_LOCK:
        if key not in _TASKS:
            _TASKS[key] = get_task(name, **(options or {}))
        return _TASKS[key]


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict[str, Any] | None = None,
                  **kwargs: Any) -> dict[str, float]:
    """verl's custom reward interface: ``{"score": reward, "acc": correct, "format_ok": ...}``."""
    info = dict(extra_info or {})
    task = task_for(data_source, info.get("task_options"))
    s = task.score(solution_str, _example(ground_truth, info.get("question"), info.get("example_meta"),
                                          info.get("example_id")))
    return {"score": float(s.reward), "acc": float(s.correct), "format_ok": float(s.format_ok)}
