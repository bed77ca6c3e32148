"""The training loop and what it runs on: run config, models and policy, rollout (sampling that
records mu), collector (rollout -> reward -> advantages -> thresholds), learner (the updates),
checkpoints and the run directory it writes. `tokentrust train` runs `loop.run_training`."""
