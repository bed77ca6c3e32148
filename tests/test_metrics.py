"""Metrics against hand-computed values and independently written formulas."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokentrust.study import metrics as M
from tokentrust.train.rundir import load_metrics

# ---------------------------------------------------------------------------------------------
# accuracy


def test_pass_at_k_hand_cases():
    assert M.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert M.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert M.pass_at_k(5, 0, 3) == 0.0
    assert M.pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k
    assert M.pass_at_k(5, 5, 5) == 1.0


def test_pass_at_k_matches_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ref = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert M.pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)
    # large n stays finite where the binomials would be astronomically large
    assert M.pass_at_k(2000, 3, 100) == pytest.approx(
        1 - math.comb(1997, 100) / math.comb(2000, 100)
    )


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError):
        M.pass_at_k(n, c, k)


def test_mean_at_k_and_greedy():
    mat = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert M.mean_at_k(mat) == pytest.approx((0.25 + 1 + 0) / 3)
    # ragged rows are averaged per problem first
    assert M.mean_at_k([[1, 0], [1, 1, 1, 0]]) == pytest.approx((0.5 + 0.75) / 2)
    assert M.greedy_pass_at_1([True, False, True, True]) == pytest.approx(0.75)
    # pass@2 of the matrix rows: 1 - C(3,2)/C(4,2) = 0.5, 1, 0
    assert M.mean_pass_at_k(mat, 2) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# stability


def _records(**cols):
    n = len(next(iter(cols.values())))
    return [
        {"step": i + 1, **{k.replace("__", "/"): v[i] for k, v in cols.items()}} for i in range(n)
    ]


def test_max_drawdown():
    assert M.max_drawdown([1, 3, 2, 5, 1]) == 4.0
    assert M.max_drawdown([0, 1, 1, 2, 3]) == 0.0
    assert M.max_drawdown([5, 4, 3]) == 2.0
    assert M.max_drawdown([2.0, float("nan"), 1.0]) == 1.0


def test_reward_noise_normalized_hand_case():
    reward, m = [0.5, 0.6, 0.5, 0.7], 100
    z = []
    for prev, cur in zip(reward, reward[1:]):
        pbar = (prev + cur) / 2
        z.append((cur - prev) / math.sqrt(2 * pbar * (1 - pbar) / m))
    assert M.reward_noise_normalized(_records(reward__mean=reward), m) == pytest.approx(np.std(z, ddof=1))
    assert math.isnan(M.reward_noise_normalized(_records(reward__mean=reward), None))
    assert math.isnan(M.reward_noise_normalized(_records(reward__mean=reward[:2]), m))
    # a run stuck at reward 0 has p clipped to 0.5/m instead of dividing by zero
    assert math.isfinite(M.reward_noise_normalized(_records(reward__mean=[0.0, 0.0, 1 / m, 0.0]), m))


def test_reward_noise_normalized_does_not_track_the_reward_level():
    """Pure Bernoulli sampling noise: the raw step noise is 0.6x as large at p = 0.1 as at p = 0.5
    (sqrt(0.09 / 0.25)), the normalised noise is about 1 at both."""
    rng = np.random.default_rng(0)
    m, steps = 64, 2000
    raw, norm = {}, {}
    for p in (0.1, 0.5):
        rec = _records(reward__mean=list(rng.binomial(m, p, size=steps) / m))
        raw[p] = M.reward_diff_std(rec)
        norm[p] = M.reward_noise_normalized(rec, m)
    assert raw[0.1] / raw[0.5] == pytest.approx(0.6, rel=0.08)
    assert norm[0.1] == pytest.approx(1.0, abs=0.08) and norm[0.5] == pytest.approx(1.0, abs=0.08)


def test_collapse_events_and_time_to_collapse():
    #        0    1    2    3    4     5    6    7    8    9
    curve = [0.1, 0.5, 0.6, 0.2, 0.25, 0.1, 0.6, 0.2, 0.2, 0.7]
    # running max 0.6 from index 2: indices 3-5 are below 0.3 (an event of 3); 7-8 only 2 steps
    assert M.collapse_events(curve) == [(3, 3)]
    assert M.collapse_events(curve, min_steps=2) == [(3, 3), (7, 2)]
    assert M.collapse_events(curve, frac=0.3) == []  # only index 5 (0.1) is below 0.18
    # a run that never reached min_peak cannot collapse
    assert M.collapse_events([0.1, 0.02, 0.01, 0.01, 0.0]) == []
    steps = np.arange(10, 20)
    assert M.time_to_collapse(steps, curve) == (13.0, True)
    assert M.time_to_collapse(steps, [0.5] * 10) == (19.0, False)  # censored at the last step
    # a collapse that lasts to the end of the run counts
    assert M.collapse_events([0.8, 0.1, 0.1, 0.1]) == [(1, 3)]


def test_reward_std_loss_var_and_diff_std():
    recs = _records(reward__mean=[1.0, 2.0, 3.0, 4.0], loss__total=[1.0, 1.0, 3.0, 3.0])
    assert M.reward_std(recs) == pytest.approx(math.sqrt(5 / 3))  # sample std of 1..4
    assert M.loss_variance(recs) == pytest.approx(4 / 3)  # deviations +-1, sum sq 4, / 3
    assert M.reward_diff_std(recs) == pytest.approx(0.0)  # a straight line has no step noise
    # loss/total missing: falls back to loss/policy
    assert M.loss_variance(_records(loss__policy=[0.0, 2.0])) == pytest.approx(2.0)
    # non-finite and missing values are skipped
    recs = _records(reward__mean=[1.0, float("nan"), 3.0, None])
    assert M.reward_std(recs) == pytest.approx(math.sqrt(2.0))


def test_grad_spike_count_hand_case():
    norms = [1, 1, 1, 1, 1, 10, 1, 1, 1, 1, 4, 1]
    # t=5: median(prev)=1, 10 > 3; t=10: window [10,1,1,1,1] median 1, 4 > 3
    assert M.grad_spike_count(norms, factor=3.0, window=5, min_history=3) == 2
    assert M.grad_spike_count(norms, factor=5.0, window=5, min_history=3) == 1
    # too little history: the big first values are never judged
    assert M.grad_spike_count([1, 100, 1, 1], factor=3.0, window=5, min_history=3) == 0
    # non-finite norms always count
    assert M.grad_spike_count([1, 1, 1, float("inf"), 1, float("nan")], min_history=3) == 2
    assert M.grad_spike_count(np.ones(50)) == 0


def test_grad_norm_p99_entropy_and_pi_mu():
    recs = _records(actor__grad_norm=list(range(101)))
    assert M.grad_norm_p99(recs) == pytest.approx(99.0)
    recs = _records(actor__entropy=[2.0 - 0.01 * (i + 1) for i in range(30)])
    e = M.entropy_trajectory(recs, window=10)
    assert e["slope"] == pytest.approx(-0.01)
    assert e["first"] == pytest.approx(np.mean([2.0 - 0.01 * s for s in range(1, 11)]))
    assert e["last"] == pytest.approx(np.mean([2.0 - 0.01 * s for s in range(21, 31)]))
    recs = _records(trust_region__abs_diff_mean=[0.1, 0.3])
    assert M.mean_abs_pi_mu(recs) == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# rare tokens and diversity


def test_bucket_shares_hand_case():
    bucket_of = torch.tensor([0, 0, 1, 1, 2, 2])
    ids = torch.tensor([0, 1, 2, 4, 4, 5, 0, 3])  # buckets 0,0,1,2,2,2,0,1
    np.testing.assert_allclose(M.bucket_shares(ids, bucket_of, 4), [3 / 8, 2 / 8, 3 / 8, 0.0])
    # nested lists and a mask over a padded tensor give the same answer
    np.testing.assert_allclose(
        M.bucket_shares([[0, 1, 2], [4, 4, 5, 0, 3]], bucket_of, 3), [3 / 8, 2 / 8, 3 / 8]
    )
    padded = torch.tensor([[0, 1, 2, 9, 9], [4, 4, 5, 0, 3]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    bucket_of10 = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 0, 0])
    np.testing.assert_allclose(
        M.bucket_shares(padded, bucket_of10, 3, mask=mask), [3 / 8, 2 / 8, 3 / 8]
    )
    assert np.isnan(M.bucket_shares([], bucket_of, 3)).all()


def test_distinct_rare_per_1k():
    rare = torch.zeros(10, dtype=torch.bool)
    rare[[5, 6, 7]] = True
    # rare types used {5, 6, 7} = 3 over 6 tokens -> 500 per 1k
    assert M.distinct_rare_per_1k([[5, 5, 6, 1], [5, 7]], rare) == pytest.approx(500.0)
    assert M.distinct_rare_per_1k([[1, 2, 3, 4]], rare) == 0.0


def test_distinct_n_token_ids_and_text():
    seqs = [[1, 2, 3], [1, 2, 4]]
    assert M.distinct_n(seqs, 1) == pytest.approx(4 / 6)
    assert M.distinct_n(seqs, 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)
    assert M.distinct_n(seqs, 3) == pytest.approx(1.0)
    assert M.distinct_n([torch.tensor([7, 7, 7, 7])], 2) == pytest.approx(1 / 3)
    assert M.distinct_n(["the cat sat", "the  cat ran\n"], 2) == pytest.approx(3 / 4)
    assert M.distinct_n(["a b", "c"], 2) == pytest.approx(1.0)  # no bigram across texts
    assert M.distinct_n(["a", "b"], 2) == 0.0
    with pytest.raises(ValueError):
        M.distinct_n(seqs, 0)


# ---------------------------------------------------------------------------------------------
# coherence


class _Bigram(torch.nn.Module):
    """logits(next | prev) = table[prev]: NLL is computable by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_sequence_nll_bigram_hand_computed():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 7, generator=g)
    model = _Bigram(table)
    prompts = [[1, 2, 3], [4]]
    responses = [[5, 6], [2, 2, 0]]
    ref = []
    for p, r in zip(prompts, responses, strict=True):
        seq = p + r
        for t in range(len(p), len(seq)):
            row = table[seq[t - 1]].double()
            ref.append(-(row[seq[t]] - torch.logsumexp(row, 0)).item())
    expect = sum(ref) / len(ref)  # token-weighted mean over 5 response tokens
    assert M.sequence_nll(model, prompts, responses, batch_size=1) == pytest.approx(
        expect, rel=1e-5
    )
    assert M.sequence_nll(model, prompts, responses, batch_size=8) == pytest.approx(
        expect, rel=1e-5
    )
    # explicit tensors with a response mask that hides the last token of the first row
    pi = torch.tensor([[1, 2, 3], [0, 0, 4]])
    pm = torch.tensor([[1, 1, 1], [0, 0, 1]])
    ri = torch.tensor([[5, 6, 3], [2, 2, 0]])
    rm = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert M.sequence_nll(model, pi, ri, rm, prompt_mask=pm) == pytest.approx(expect, rel=1e-5)


def test_sequence_nll_left_padding_matches_unpadded():
    # GPT-2 has absolute position embeddings, so wrong positions under left padding would show
    # (a RoPE model would not notice a constant shift).
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=40,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    responses = [[1, 2], [5, 6, 7, 8], [9]]
    nll_sum, count = 0.0, 0
    for p, r in zip(prompts, responses, strict=True):  # unpadded, one at a time
        nll = M.sequence_nll(model, [p], [r])
        nll_sum += nll * len(r)
        count += len(r)
    batched = M.sequence_nll(model, prompts, responses, batch_size=3)
    assert batched == pytest.approx(nll_sum / count, rel=1e-4)
    assert model.training  # mode restored


# ---------------------------------------------------------------------------------------------
# trust-region tables and correlations


def test_bucket_table_averages_over_steps():
    recs = [
        {
            "step": 1,
            "trust_region/kept_frac/bucket_0": 0.9,
            "trust_region/kept_frac/bucket_2": 0.5,
            "trust_region/kept_frac/bucket_0/pos": 1.0,
            "trust_region/delta_mean/bucket_1": 0.1,
            "trust_region/kept_frac": 0.8,
            "rare/share/bucket_0": 0.7,
        },
        {
            "step": 2,
            "trust_region/kept_frac/bucket_0": 0.7,
            "trust_region/kept_frac/bucket_0/pos": 0.8,
            "trust_region/delta_mean/bucket_1": float("nan"),
        },
    ]
    t = M.bucket_table(recs, "trust_region")
    assert set(t) == {"kept_frac", "kept_frac/pos", "delta_mean"}
    np.testing.assert_allclose(t["kept_frac"], [0.8, np.nan, 0.5])
    np.testing.assert_allclose(t["kept_frac/pos"], [0.9, np.nan, np.nan])
    np.testing.assert_allclose(t["delta_mean"], [np.nan, 0.1, np.nan])
    np.testing.assert_allclose(M.bucket_table(recs, "rare")["share"], [0.7])


def test_pearson_and_spearman():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert M.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); d = [-1, 1, -1, 1, 0] -> 1 - 24 / 120
    assert M.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert M.spearman(x, x**3) == pytest.approx(1.0)
    assert M.spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]
    expect = np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1]
    assert M.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(expect)
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------------------------------------
# one run -> one flat dict


def _write_run(d, records, results=None, trailing="", done=True):
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(trailing)
    if results is not None:
        (d / "eval").mkdir()
        (d / "eval" / "results.json").write_text(json.dumps(results))
    if done:
        (d / "DONE").write_text("")


def test_load_metrics_partial_line_and_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(
        '{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x": 3}\n'
        '{"step": 2, "x": 20}\n{"step": 3, "x": 30}\n{"step": 4, "x"'
    )
    recs = load_metrics(tmp_path)
    assert [(r["step"], r["x"]) for r in recs] == [(1, 1), (2, 20), (3, 30)]
    # a partial line that a resumed writer appended to, in the middle: skipped with a warning
    p.write_text('{"step": 1, "x": 1}\n{"step": 2, "x"{"step": 2, "x": 2}\n')
    with pytest.warns(UserWarning):
        recs = load_metrics(p)
    assert [r["step"] for r in recs] == [1]
    assert load_metrics(tmp_path / "nope") == []


def test_summarize_run(tmp_path):
    reward = [0.1, 0.3, 0.2, 0.5, 0.1] + [0.4] * 10
    norms = [1.0] * 10 + [50.0] + [1.0] * 4
    recs = []
    for i, (r, g) in enumerate(zip(reward, norms, strict=True)):
        recs.append(
            {
                "step": i + 1,
                "reward/mean": r,
                "actor/grad_norm": g,
                "loss/total": float(i),
                "actor/entropy": 1.0,
                "trust_region/kept_frac": 0.9,
                "trust_region/kept_frac/bucket_0": 0.95,
                "trust_region/kept_frac/bucket_3/neg": 0.5,
                "rare/share/bucket_4": 0.01 * i,
                "train/nonfinite_skipped": 1 if i == 3 else 0,
            }
        )
    results = {
        "greedy_pass@1": 0.25,
        "mean@k": 0.2,
        "pass@k": 0.6,
        "k": 8,
        "n": 8,
        "coherence_nll": 1.5,
        "rare_share": 0.03,
        "distinct_2": 0.7,
        "bucket_shares": [0.6, 0.3, 0.1],
        "note": "text is ignored",
    }
    _write_run(tmp_path / "run", recs, results, trailing='{"step": 16, "rew')
    (tmp_path / "run" / "config.json").write_text(json.dumps({"rollout": {"prompts_per_step": 4, "group_size": 5}}))
    s = M.summarize_run(tmp_path / "run")
    assert s["stability/reward_noise_norm"] == pytest.approx(M.reward_noise_normalized(recs, 20))
    # running max 0.5 at step 4; step 5 (0.1) is a single step below 0.25: no collapse
    assert s["stability/collapse_count"] == 0.0 and s["stability/collapsed"] == 0.0
    assert s["stability/time_to_collapse"] == 15.0
    assert s["train/steps"] == 15 and s["train/last_step"] == 15 and s["train/done"] == 1.0
    assert s["stability/max_drawdown"] == pytest.approx(0.4)
    assert s["stability/reward_std"] == pytest.approx(np.std(reward, ddof=1))
    assert s["stability/grad_spikes"] == 1.0
    assert s["stability/loss_var"] == pytest.approx(np.var(np.arange(15.0), ddof=1))
    assert s["stability/nonfinite_skipped"] == 1.0
    assert s["train/reward_first10"] == pytest.approx(np.mean(reward[:10]))
    assert s["train/reward_last10"] == pytest.approx(0.4)
    assert s["trust_region/kept_frac"] == pytest.approx(0.9)
    assert s["trust_region/kept_frac/bucket_0"] == pytest.approx(0.95)
    assert s["trust_region/kept_frac/bucket_3/neg"] == pytest.approx(0.5)
    assert s["train/rare_last10/share/bucket_4"] == pytest.approx(0.01 * np.mean(range(5, 15)))
    assert s["eval/greedy_pass@1"] == 0.25 and s["eval/mean@k"] == 0.2 and s["eval/pass@k"] == 0.6
    assert s["eval/k"] == 8
    assert s["coherence/nll"] == 1.5 and s["coherence/ppl"] == pytest.approx(math.exp(1.5))
    assert s["rare/share_rare"] == 0.03 and s["rare/distinct_2"] == 0.7
    assert s["rare/share/bucket_2"] == pytest.approx(0.1)
    assert "eval/note" not in s
    assert all(isinstance(v, float) for v in s.values())
    # a run without eval results or DONE still summarizes
    _write_run(tmp_path / "run2", recs[:3], done=False)
    s2 = M.summarize_run(tmp_path / "run2")
    assert s2["train/done"] == 0.0 and "eval/greedy_pass@1" not in s2
    assert math.isnan(s2["stability/reward_noise_norm"])  # no config.json: m unknown


def test_sequence_nll_of_a_llama_takes_the_packed_path_and_agrees():
    """A Llama runs through tokentrust.train.packed (no padding, shared prompts); its NLL equals the
    per-token NLL of plain unpadded forwards, one sequence at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                      eos_token_id=1)
    model = LlamaForCausalLM(cfg)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [3, 4, 5, 6, 7], [10, 11, 12]]  # a prompt repeated, as in GRPO groups
    responses = [[1, 2], [5, 6, 7, 8], [9, 2, 2], [9]]
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
            total -= sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(r))
            count += len(r)
    assert M.sequence_nll(model, prompts, responses) == pytest.approx(total / count, rel=1e-5)
