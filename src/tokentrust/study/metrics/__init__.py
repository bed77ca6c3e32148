"""Metrics of a run, one module per kind of measurement; every public name is re-exported here, so
`tokentrust.study.metrics.<name>` reaches all of them:

- `accuracy`: greedy pass@1, mean@k, unbiased pass@k;
- `tokens`: shares per corpus-frequency bucket, distinct rare tokens, distinct n-grams;
- `coherence`: NLL of completions under a frozen reference model;
- `curves`: a metric's curve over steps, per-bucket tables, correlations;
- `stability`: reward noise, collapses, drawdowns, gradient spikes;
- `summary`: one run directory -> one flat dict (`summarize_run`), the row the report aggregates.

Inference over seeds lives in `tokentrust.study.inference`; reading run files in
`tokentrust.train.rundir` (`load_metrics`).

Everything here is a pure function of logged data (RUN_DIR/metrics.jsonl, eval/results.json) or of
a frozen model; nothing touches trainer state.

Conventions:
- Curves are read in step order; missing / non-finite values are skipped, not imputed.
- Higher frequency-bucket ids are rarer (`tokentrust.vocab.FrequencyTable.buckets`: bucket 0 is the
  most frequent tokens, the last seen bucket the rarest, then one bucket for unseen tokens).
"""

from tokentrust.study.metrics.accuracy import greedy_pass_at_1, mean_at_k, mean_pass_at_k, pass_at_k  # noqa: F401
from tokentrust.study.metrics.coherence import sequence_nll  # noqa: F401
from tokentrust.study.metrics.curves import Record, bucket_table, curve, pearson, spearman  # noqa: F401
from tokentrust.study.metrics.stability import (  # noqa: F401
    collapse_events,
    drawdown_smoothed,
    entropy_trajectory,
    grad_norm_p99,
    grad_spike_count,
    loss_variance,
    max_drawdown,
    mean_abs_pi_mu,
    reward_diff_std,
    reward_noise_design_effect,
    reward_noise_normalized,
    reward_std,
    time_to_collapse,
    uniform_group_probability,
)
from tokentrust.study.metrics.summary import (  # noqa: F401
    rollout_shape,
    samples_per_step,
    summarize_eval,
    summarize_records,
    summarize_run,
)
from tokentrust.study.metrics.tokens import bucket_shares, distinct_n, distinct_rare_per_1k  # noqa: F401
