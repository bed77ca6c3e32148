"""Live progress of eval and vocab build: what they report matches what they compute."""

from __future__ import annotations

import json

import torch

from tokentrust.study.evaluate import evaluate
from tokentrust.train.rollout.base import RolloutBatch
from tokentrust.tasks import get_task


class _ScriptedRollout:
    """Answers problem i correctly when i is even (greedy) / for sample 0 only (sampling)."""

    def __init__(self, task, examples, samples):
        self.task, self.examples, self.samples = task, examples, samples
        self.model = torch.nn.Linear(1, 1)
        self.reset()

    def reset(self):
        self.calls = {True: 0, False: 0}
        return self

    def generate(self, prompts, generator=None, greedy=False):
        texts = []
        for _ in prompts:
            k = self.calls[greedy]
            self.calls[greedy] += 1
            i, j = (k, 0) if greedy else divmod(k, self.samples)
            good = (i % 2 == 0) if greedy else j == 0
            texts.append(self.task.sft_text(self.examples[i]) if good else "#### 0 nothing")
        n = len(prompts)
        ones = torch.ones(n, 2, dtype=torch.long)
        return RolloutBatch(ones, ones, ones, ones, torch.zeros(n, 2), texts, 2 * n)


def test_eval_progress_shows_the_running_accuracy(monkeypatch, capsys):
    monkeypatch.setenv("TOKENTRUST_PROGRESS", "plain")
    task = get_task("arith", num_train=8, num_test=6)
    examples = task.examples("test")
    rollout = _ScriptedRollout(task, examples, samples=2)
    monkeypatch.setattr("tokentrust.train.rollout.make_rollout", lambda *a, **k: rollout.reset())
    res = evaluate(rollout.model, None, task, samples=2, batch_size=4, progress=True)
    out = capsys.readouterr().out
    assert "\r" not in out
    # 6 problems x (1 greedy + 2 samples); the last line reports the sampled accuracy (sample 0 of each)
    assert out.strip().splitlines()[-1].startswith("eval arith: 18/18 generations")
    assert out.strip().endswith("| sampled accuracy 0.500 over 12")
    assert res["greedy_pass@1"] == 0.5 and res["mean@k"] == 0.5 and res["pass@k"] == 1.0
    evaluate(rollout.model, None, task, samples=2, batch_size=4)  # progress off by default
    assert capsys.readouterr().out == ""


def test_eval_greedy_only_with_zero_samples(monkeypatch, tmp_path):
    task = get_task("arith", num_train=8, num_test=6)
    examples = task.examples("test")
    rollout = _ScriptedRollout(task, examples, samples=2)
    monkeypatch.setattr("tokentrust.train.rollout.make_rollout", lambda *a, **k: rollout.reset())
    res = evaluate(rollout.model, None, task, samples=0, batch_size=4, out_dir=tmp_path)
    assert rollout.calls[False] == 0 and rollout.calls[True] == 6  # no sampled generation at all
    assert res["greedy_pass@1"] == 0.5 and "mean@k" not in res and "pass@k" not in res
    rows = [json.loads(x) for x in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["samples"] == [] and rows[0]["answer_class"] in ("rare", "common")
    assert res["num_rare_answer"] + res["num_common_answer"] == 6


def test_vocab_build_reports_docs_and_tokens_counted():
    from tokentrust.train.models import train_bpe_tokenizer
    from tokentrust.vocab import build_frequency_table

    docs = [f"the cat {i} sat on {i * 7} mats" for i in range(25)]
    tok = train_bpe_tokenizer(docs, vocab_size=300)
    seen = []
    table = build_frequency_table(tok, [docs], batch_size=10, progress=lambda d, t: seen.append((d, t)))
    assert [d for d, _ in seen] == [10, 20, 25]
    assert seen[-1][1] == table.num_tokens == sum(len(tok.encode(d, add_special_tokens=False)) for d in docs)
