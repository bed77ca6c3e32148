"""tokentrust tasks as engine rewards: TRL's reward_funcs call and verl's compute_score call, made
the way those engines make them (no TRL / verl import), give the task's own scores."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tokentrust.rewards import compute_score, task_rows, trl_reward, verl_rows
from tokentrust.tasks import get_task

GSM_ROWS = [{"question": "Tom has 3 apples and buys 1,231 more. How many?", "answer": "3 + 1231 = 1234.\n#### 1,234"},
            {"question": "A pen costs $2. How much do 5 pens cost?", "answer": "5 * 2 = 10.\n#### 10"}]


def _tasks(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    for split in ("train", "test"):
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM_ROWS))
    out = [("arith", {"num_train": 6, "num_test": 2}),
           ("gsm8k", {"data_dir": str(tmp_path / "gsm8k"), "answer_fallback": True, "format_reward": 0.25})]
    if importlib.util.find_spec("reasoning_gym"):
        out.append(("rg/chain_sum", {"num_train": 6, "num_test": 2, "min_terms": 2, "max_terms": 3}))
    return out


def _completions(task, ex):
    """Right and formatted, right but unformatted, wrong, empty."""
    return [task.sft_text(ex), f"so it is {ex.answer}", "#### 7 nothing\n<answer>-99999</answer>", ""]


def test_trl_reward_funcs_signature(tmp_path):
    for name, options in _tasks(tmp_path):
        task = get_task(name, **options)
        reward = trl_reward(name, **options)
        rows = task_rows(task, "train", limit=3)
        inputs, expected = [], []
        for row, ex in zip(rows, task.examples("train")):
            for text in _completions(task, ex):
                inputs.append({**row, "completion": [{"role": "assistant", "content": text}]})
                expected.append(task.score(text, ex).reward)
        # as TRL 1.16's GRPOTrainer._calculate_rewards calls it: every non-prompt column as a keyword list
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
        got = reward(prompts=[x["prompt"] for x in inputs], completions=[x["completion"] for x in inputs],
                     completion_ids=[[1, 2]] * len(inputs), trainer_state=None, **columns)
        assert got == expected, name
        assert max(got) > 0 and min(got) == 0  # the cases really differ
        plain = reward(prompts=None, completions=[x["completion"][0]["content"] for x in inputs], **columns)
        assert plain == expected  # standard (non-conversational) completions
        assert reward.__name__ == "tokentrust_" + name.replace("/", "_")
    with pytest.raises(ValueError, match="column 'answer'"):
        reward(prompts=["p"], completions=["c"])


def test_verl_compute_score_signature(tmp_path):
    for name, options in _tasks(tmp_path):
        task = get_task(name, **options)
        for row, ex in zip(verl_rows(task, "train", options, limit=3), task.examples("train")):
            assert row["data_source"] == f"tokentrust/{name}"
            for text in _completions(task, ex):
                want = task.score(text, ex)
                # as verl 0.9.1's reward loop (NaiveRewardManager.run_single) calls a custom compute_score
                got = compute_score(data_source=row["data_source"], solution_str=text,
                                    ground_truth=row["reward_model"]["ground_truth"], extra_info=row["extra_info"])
                assert got == {"score": want.reward, "acc": float(want.correct), "format_ok": float(want.format_ok)}
    # verl's own GSM8K preprocessing (data_source openai/gsm8k, bare gold, no options: strict format)
    got = [compute_score("openai/gsm8k", text, "1234", {"split": "train", "index": 0})["score"]
           for text in ("#### 1,234", "The answer is 1234", "we get 1234", "#### 1235")]
    assert got == [1.0, 1.0, 0.0, 0.0]
