"""The command line: one-line errors without tracebacks (``--debug`` shows them), non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tokentrust.cli import main
from tokentrust.train.config import resolve


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tokentrust.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["train", "--set", "algo.delta=-1"], "algo.delta must be > 0"),
    (["train", "--set", "algo.loss=trpo"], "available: bandpo, cppo, dcpo, decoupled-ppo, dppo-kl"),
    (["train", "--set", "algo.thresholds.s_min=5"], "algo.thresholds.s_min"),
    (["train", "--set", "rollout.group_size=1"], "rollout.group_size"),
    (["train", "--set", "algo.nope=1"], "unknown config key 'algo.nope'"),
    (["train", "--config", "/nonexistent.json"], "config file not found"),
    (["train", "--resume"], "--resume needs --out"),
])
def test_config_errors_are_one_line(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokentrust: error:") and needle in err and "\n" not in err


def test_debug_shows_the_traceback():
    r = _run("--debug", "train", "--set", "algo.delta=0")
    assert r.returncode != 0 and "Traceback" in r.stderr and "algo.delta" in r.stderr
    r = _run("train", "--set", "algo.delta=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_malformed_dataset_line_is_reported_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "gsm8k"
    data.mkdir()
    good = json.dumps({"question": "1+1?", "answer": "2\n#### 2"})
    (data / "train.jsonl").write_text(good + "\n{not json\n" + good + "\n")
    (data / "test.jsonl").write_text(good + "\n")
    code = main(["eval", "--model", "/nonexistent-model", "--task", "gsm8k", "--data-dir", str(data),
                 "--split", "train"])
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl:2" in err and "\n" not in err.strip()


def test_print_config_and_help(capsys):
    assert main(["train", "--print-config", "--set", "algo.delta=0.2"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)
    assert cfg["algo"]["delta"] == 0.2 and cfg["model"]["name"] == "tiny"
    assert cfg == resolve(overrides={"algo": {"delta": 0.2}}).to_dict()  # the fully resolved config, as YAML
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_compare_lists_methods(capsys):
    assert main(["compare", "--list-methods"]) == 0
    out = capsys.readouterr().out
    for m in ("ppo", "clip-higher", "dppo-tv", "dppo-kl", "cppo", "drpo", "av-freq", "av-batch-norm",
              "av-entropy", "av-combined-norm", "av-freq-inverse"):
        assert m in out


def test_train_with_greedy_only_evaluation(tmp_path, capsys, one_thread):
    """eval_samples 0: the run finishes and prints greedy pass@1 only (it raised KeyError 'mean@k')."""
    from conftest import tiny_overrides

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(tiny_overrides(tmp_path / "run", max_steps=1, task={"eval_samples": 0})))
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("eval arith/test: greedy pass@1 ") and "mean@" not in line
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["k"] == 0 and "mean@k" not in results
