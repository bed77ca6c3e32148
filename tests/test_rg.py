"""reasoning-gym tasks (the `rg` extra): scores equal reasoning-gym's own, bounded in time, and a
2-step tiny-model run on one."""

from __future__ import annotations

import json

import pytest

rg = pytest.importorskip("reasoning_gym")

from conftest import tiny_overrides  # noqa: E402
from tokentrust.train.config import resolve  # noqa: E402
from tokentrust.train.rundir import read_jsonl  # noqa: E402
from tokentrust.tasks import get_task  # noqa: E402
from tokentrust.tasks.rg import TEST_SEED_OFFSET, extract_answer  # noqa: E402

rg_extract = pytest.importorskip("reasoning_gym.utils").extract_answer


def _hand_made(gold: str) -> list[str | None]:
    """Right, right with spacing, right as a float, off by one, garbage, empty, no answer."""
    out: list[str | None] = [gold, f"  {gold} ", None, "", "banana", "1 + 1"]
    try:
        n = int(gold)
        out += [f"{n}.0", str(n + 1), f"{n:,}"]
    except ValueError:
        out += [gold.replace(" ", ""), gold + " + 0", "(" + gold + ")"]
    return out


@pytest.mark.parametrize("dataset, options", [
    ("countdown", {"min_numbers": 3, "max_numbers": 4}),
    ("basic_arithmetic", {}),
    ("chain_sum", {"min_terms": 2, "max_terms": 3}),
    ("gsm_symbolic", {}),
])
def test_scores_match_reasoning_gym_score_answer(dataset, options):
    task = get_task(f"rg/{dataset}", seed=3, num_train=6, num_test=3, **options)
    reference = rg.create_dataset(dataset, seed=3, size=6, **options)  # regenerated independently
    for i, ex in enumerate(task.examples("train")[:3]):
        entry = reference[i]
        assert (ex.question, ex.answer) == (entry["question"], str(entry["answer"]))
        for answer in _hand_made(ex.answer):
            completion = "thinking...\n" + ("" if answer is None else f"<answer>{answer}</answer>")
            got = task.score(completion, ex)
            want = float(reference.score_answer(rg_extract(completion), entry))  # reasoning-gym's own pipeline
            assert got.reward == want, (dataset, answer)
            assert got.correct == (want >= 1.0) and got.format_ok == (answer is not None) and got.pred == (
                None if answer is None else answer.strip())


def test_splits_prompt_and_options():
    task = get_task("rg/chain_sum", seed=0, num_train=40, num_test=40, min_terms=2, max_terms=2, max_digits=1)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 40 and 0 < len(test) <= 40
    assert not {e.question for e in train} & {e.question for e in test}  # tiny problem space: duplicates dropped
    ref_test = rg.create_dataset("chain_sum", seed=TEST_SEED_OFFSET, size=40, min_terms=2, max_terms=2, max_digits=1)
    assert test[0].question == ref_test[test[0].meta["index"]]["question"]
    ex = train[0]
    assert task.prompt(ex).endswith(ex.question) and "<answer>" in task.prompt(ex)
    assert task.score(task.sft_text(ex), ex).correct
    with pytest.raises(ValueError, match="task.options for rg/chain_sum"):
        get_task("rg/chain_sum", bogus_option=1)
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'"):
        get_task("rg/nope")
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("no tags\n 42 \n\n") is None and extract_answer("no tags\n 42 \n", True) == "42"


def test_score_answer_is_bounded_in_time():
    """countdown's score_answer runs sympy's parse_expr on the answer: a power tower would run for
    ages in-process (unbounded, it did not finish in 20 s); here the call ends by its deadline with 0,
    through the worker's own timer or, failing that, the parent's kill and a fresh worker."""
    import time

    task = get_task("rg/countdown", num_train=2, num_test=1, timeout_s=1.0)
    ex = task.examples("train")[0]
    assert task.score(task.sft_text(ex), ex).reward == 1.0  # the worker is up
    pid = task.scorer._worker.proc.pid
    t0 = time.monotonic()
    slow = task.score("<answer>9**9**9**9**9</answer>", ex)
    assert time.monotonic() - t0 < 3.0 and slow.reward == 0.0 and not slow.correct
    task.scorer.timeout_s = 0.0  # a deadline already passed: the parent kills and replaces the worker
    assert task.score(task.sft_text(ex), ex).reward == 0.0
    assert task.scorer.timeouts >= 1 and task.scorer._worker is None
    task.scorer.timeout_s = 1.0
    assert task.score(task.sft_text(ex), ex).reward == 1.0 and task.scorer._worker.proc.pid != pid
    task.scorer.close()


def test_two_training_steps_on_a_reasoning_gym_task(tmp_path, one_thread):
    from tokentrust.train.loop import Trainer

    over = tiny_overrides(tmp_path / "run", task={"name": "rg/chain_sum", "eval_limit": 2,
                                                  "options": {"num_train": 48, "num_test": 8, "min_terms": 2,
                                                              "max_terms": 2, "max_digits": 1}},
                          rollout={"max_new_tokens": 10})
    trainer = Trainer(resolve(overrides=over), quiet=True)
    try:
        trainer.train()
        results = trainer.finish()
    finally:
        trainer.close()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(0 <= r["reward/mean"] <= 1 for r in records)
    assert results["task"] == "rg/chain_sum" and results["num_problems"] == 2
    # the frequency table counts the generated training split (question + answer of each problem)
    texts = list(trainer.task.corpus_texts("train"))
    assert trainer.table.meta["num_docs"] == len(texts) == 48
    assert trainer.table.num_tokens == sum(len(trainer.tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    for row in read_jsonl(tmp_path / "run" / "samples.jsonl"):  # logged rewards are the task's scores
        ex = next(e for e in trainer.train_examples if e.question in row["prompt"])
        assert row["reward"] == trainer.task.score(row["completion"], ex).reward
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"]["name"] == "rg/chain_sum"


def test_a_scorer_timeout_is_counted_and_the_worker_kept():
    """The power tower runs into the worker's own timer: score 0, one timeout counted, same worker."""
    from tokentrust.verifiers import count_failures

    task = get_task("rg/countdown", num_train=2, num_test=1, timeout_s=1.0)
    ex = task.examples("train")[0]
    try:
        assert task.score(task.sft_text(ex), ex).reward == 1.0
        pid = task.scorer._worker.proc.pid
        with count_failures() as failed:
            assert task.score("<answer>9**9**9**9**9</answer>", ex).reward == 0.0
            assert task.score(task.sft_text(ex), ex).reward == 1.0
        assert (failed.timeouts, failed.errors) == (1, 0) and task.scorer._worker.proc.pid == pid
    finally:
        task.scorer.close()


@pytest.mark.parametrize("failure", ["timeouts", "errors"])
def test_verifier_failures_are_counted_per_step(tmp_path, one_thread, monkeypatch, failure):
    """A verifier that times out (timeout_s=0: every deadline has passed) or whose worker dies scores 0,
    and the step's record counts it: reward/verifier_<kind> = one per sampled completion (2 x 2)."""
    from tokentrust.tasks.rg import _ScoreWorker
    from tokentrust.train.loop import Trainer

    options = {"num_train": 48, "num_test": 8, "min_terms": 2, "max_terms": 2, "max_digits": 1}
    if failure == "timeouts":
        options["timeout_s"] = 0.0
    else:  # a worker that says ready, then exits: every call finds it dead
        script = tmp_path / "dying_worker.py"
        script.write_text("print('{\"ready\": true}', flush=True)\n")
        monkeypatch.setattr(_ScoreWorker, "script", str(script))
    over = tiny_overrides(tmp_path / "run", task={"name": "rg/chain_sum", "eval_limit": 0, "options": options},
                          rollout={"max_new_tokens": 10})
    trainer = Trainer(resolve(overrides=over), quiet=True)
    try:
        rec = trainer.train_step()
    finally:
        trainer.close()
    other = "errors" if failure == "timeouts" else "timeouts"
    assert rec[f"reward/verifier_{failure}"] == 4 and rec[f"reward/verifier_{other}"] == 0
    assert rec["reward/mean"] == 0.0
