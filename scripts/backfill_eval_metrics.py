"""Add the eval keys of ``tokentrust.study.eval_metrics`` to runs evaluated before they existed.

    python scripts/backfill_eval_metrics.py runs/stress-primary [--force]

For every GRID_DIR/runs/<method>/seed_<s>/ (or a single run directory) whose eval/results.json lacks
``garbage_share``: rebuild the run's task and frequency table (its config.json, the tokenizer in
final_model/), recompute accuracy by answer class and the garbage share from the *stored*
eval/problems.jsonl (the same outputs; nothing is generated again), merge the keys into results.json
and add ``answer_class`` to each problem row. Existing keys are left as they are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokentrust.train.config import RunConfig, from_dict
from tokentrust.study.eval_metrics import task_results
from tokentrust.train.rundir import atomic_write_json, atomic_write_text, read_jsonl


def run_dirs(path: Path) -> list[Path]:
    if (path / "eval").is_dir():
        return [path]
    return sorted(p for p in path.glob("runs/*/seed_*") if (p / "eval" / "problems.jsonl").exists())


def backfill(run: Path, tables: dict, force: bool = False) -> bool:
    """Merge the new keys into ``run``/eval/results.json; False when there was nothing to do."""
    from transformers import AutoTokenizer

    from tokentrust.train.policy import frequency_table_for
    from tokentrust.tasks import get_task
    from tokentrust.train.loop import task_options

    res_path, prob_path = run / "eval" / "results.json", run / "eval" / "problems.jsonl"
    results = json.loads(res_path.read_text(encoding="utf-8"))
    if "garbage_share" in results and not force:
        return False
    cfg = from_dict(RunConfig, json.loads((run / "config.json").read_text(encoding="utf-8")))
    task = get_task(cfg.task.name, **task_options(cfg))
    th = cfg.algo.thresholds
    key = (cfg.task.name, json.dumps(task_options(cfg), sort_keys=True), th.table, tuple(th.table_corpus))
    if key not in tables:  # every run of a grid shares its task, tokenizer and table
        tokenizer = AutoTokenizer.from_pretrained(run / "final_model")
        tables[key] = frequency_table_for(tokenizer, task, table_path=th.table, corpus=th.table_corpus,
                                          cache_dir=cfg.model.cache_dir)
    table = tables[key]
    rows = read_jsonl(prob_path)
    responses = [r for row in rows for r in row["sample_token_ids"]]
    info = table.token_info(max([table.vocab_size, *(t + 1 for r in responses for t in r)]), th.bucket_edges)
    results.update(task_results(task, [row["gold"] for row in rows], [row["greedy_correct"] for row in rows],
                                [row["samples_correct"] for row in rows], responses, info))
    for row in rows:
        row["answer_class"] = task.answer_class(row["gold"])
    atomic_write_text(prob_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write_json(res_path, results)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="grid directory or run directory")
    ap.add_argument("--force", action="store_true", help="recompute runs that already have the keys")
    args = ap.parse_args()
    tables: dict = {}
    runs = run_dirs(Path(args.path))
    done = sum(backfill(run, tables, args.force) for run in runs)
    print(f"{done} of {len(runs)} run(s) backfilled")


if __name__ == "__main__":
    main()
