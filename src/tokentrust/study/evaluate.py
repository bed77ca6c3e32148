"""Held-out evaluation: greedy pass@1, mean@k and unbiased pass@k, plus rare-token and coherence metrics."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tokentrust.study import metrics as M
from tokentrust.study.eval_metrics import task_results
from tokentrust.train.prompting import format_prompt
from tokentrust.train.rundir import atomic_write_json, atomic_write_text
from tokentrust.train.tracking import Progress


def _generate_all(rollout: Any, prompts: list[str], batch_size: int, *, greedy: bool, seed: int,
                  on_batch: Callable[[Any], None] | None = None) -> list[Any]:
    """Generate for every prompt in batches; returns one RolloutBatch per batch (each also given to ``on_batch``)."""
    out = []
    device = next(rollout.model.parameters()).device if hasattr(rollout, "model") else torch.device("cpu")
    for i in range(0, len(prompts), batch_size):
        g = torch.Generator(device=device)
        g.manual_seed(seed * 100_003 + i)
        out.append(rollout.generate(prompts[i:i + batch_size], generator=g, greedy=greedy))
        if on_batch is not None:
            on_batch(out[-1])
    return out


def _rows(batches: list[Any]) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, response ids, text) per generated sequence, padding removed."""
    rows = []
    for b in batches:
        for j in range(len(b)):
            p = b.prompt_ids[j][b.prompt_mask[j].bool()].tolist()
            r = b.response_ids[j][b.response_mask[j].bool()].tolist()
            rows.append((p, r, b.response_texts[j]))
    return rows


def evaluate(model: torch.nn.Module, tokenizer: Any, task: Any, *, out_dir: str | Path | None = None,
             split: str = "test", limit: int | None = None, samples: int = 4, max_new_tokens: int = 256,
             temperature: float = 1.0, seed: int = 0, batch_size: int = 32, table: Any = None,
             bucket_edges: Sequence[float] = (0.5, 0.8, 0.95, 0.99), system_prompt: str | None = None,
             reference: torch.nn.Module | None = None, backend: str = "hf", progress: bool = False,
             greedy_batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``task``'s ``split``; writes results.json and problems.jsonl to ``out_dir``.

    Greedy decoding gives pass@1; ``samples`` draws at ``temperature`` give mean@k and the unbiased
    pass@k (n = k samples; 0: greedy only, and the token statistics come from the greedy outputs).
    With a frequency ``table``: rare-token shares and distinct-n of the
    sampled generations; with a ``reference`` model: their per-token NLL under it (coherence).
    ``progress``: show generations done and the running accuracy (``tokentrust.train.tracking.Progress``).
    ``greedy_batch_size`` (default 4 x ``batch_size``): prompts per greedy batch. Greedy decoding draws
    no random numbers, so the batch size changes only float rounding (each row's tokens are its own
    argmaxes; tests/test_packed.py checks equal tokens), and larger batches pay the per-step Python
    and kernel-launch cost once for more rows (640 problems: 3.6 -> 2.7 CPU s on the tiny preset).
    Sampled generations keep ``batch_size``: their generators are seeded per batch.
    """
    from tokentrust.train.rollout import make_rollout

    t0 = time.time()
    examples = task.examples(split)
    if limit:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} split {split!r} has no examples to evaluate")
    prompts = [format_prompt(tokenizer, task, ex, system_prompt) for ex in examples]
    was_training = model.training
    model.eval()
    extra = {"workdir": tempfile.mkdtemp(prefix="tokentrust-vllm-")} if backend == "vllm" else {}
    rollout = make_rollout(backend, model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, **extra)
    greedy_ok: list[bool] = []
    flat_ok: list[bool] = []  # sample j of problem i at i * samples + j
    with Progress(len(examples) * (1 + samples), f"eval {task.name}", "generations", quiet=not progress) as bar:
        def score(ok: list[bool], golds: list[Any], label: str) -> Callable[[Any], None]:
            def on_batch(batch: Any) -> None:
                ok.extend(task.score(text, golds[len(ok)]).correct for text in batch.response_texts)
                bar.update(len(batch), f"{label} accuracy {sum(ok) / len(ok):.3f} over {len(ok)}")
            return on_batch

        greedy_rows = _rows(_generate_all(rollout, prompts, greedy_batch_size or 4 * batch_size, greedy=True, seed=seed,
                                          on_batch=score(greedy_ok, examples, "greedy")))
        sample_rows = _rows(_generate_all(rollout, [p for p in prompts for _ in range(samples)], batch_size,
                                          greedy=False, seed=seed + 1,
                                          on_batch=score(flat_ok, [ex for ex in examples for _ in range(samples)],
                                                         "sampled"))) if samples else []
    model.train(was_training)
    sample_ok = [flat_ok[i * samples:(i + 1) * samples] for i in range(len(examples))]
    results: dict[str, Any] = {
        "task": task.name, "split": split, "n": samples, "k": samples, "num_problems": len(examples),
        "greedy_pass@1": M.greedy_pass_at_1(greedy_ok),
        "temperature": temperature, "max_new_tokens": max_new_tokens,
    }
    if samples:
        results.update({"mean@k": M.mean_at_k(sample_ok), "pass@1": M.mean_pass_at_k(sample_ok, 1),
                        "pass@k": M.mean_pass_at_k(sample_ok, samples)})
    stat_rows = sample_rows or greedy_rows  # token statistics: the samples, or greedy when there are none
    responses = [r for _, r, _ in stat_rows]
    info = _token_stats(results, responses, table, bucket_edges)
    results.update(task_results(task, [ex.answer for ex in examples], greedy_ok, sample_ok, responses, info))
    if reference is not None:
        keep = [i for i, r in enumerate(responses) if r]
        if keep:
            results["coherence_nll"] = M.sequence_nll(reference, [stat_rows[i][0] for i in keep],
                                                      [responses[i] for i in keep])
    results["seconds"] = time.time() - t0

    if out_dir is not None:
        _write(Path(out_dir), task, examples, greedy_rows, greedy_ok, sample_rows, sample_ok, samples, results)
    return results


def _token_stats(results: dict[str, Any], responses: list[list[int]], table: Any,
                 bucket_edges: Sequence[float]) -> Any:
    """Length, distinct-n and, with a frequency table, rare-token statistics of the responses, added
    to ``results``; returns the table's TokenInfo (None without a table)."""
    info = None
    n_tokens = sum(len(r) for r in responses)
    results["mean_length"] = n_tokens / max(len(responses), 1)
    for n in (1, 2, 3):
        results[f"distinct_{n}"] = M.distinct_n(responses, n)
    if table is not None:
        rows = max([table.vocab_size, *(t + 1 for r in responses for t in r)])
        info = table.token_info(rows, bucket_edges)
        flat = [t for r in responses for t in r]
        shares = M.bucket_shares(flat, info.bucket, info.num_buckets)
        results["bucket_shares"] = [float(s) for s in shares]
        # rare: beyond 95% of the corpus token mass or unseen; special tokens (EOS, ...) never count
        results["rare_share"] = float(info.rare[flat].float().mean()) if flat else float("nan")
        results["distinct_rare_per_1k"] = M.distinct_rare_per_1k(flat, info.rare)
    return info


def _write(out: Path, task: Any, examples: list[Any], greedy_rows: list[Any], greedy_ok: list[bool],
           sample_rows: list[Any], sample_ok: list[list[bool]], samples: int, results: dict[str, Any]) -> None:
    """OUT/problems.jsonl (each problem's completions, token ids and scores) and OUT/results.json."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples):
        rows = sample_rows[i * samples:(i + 1) * samples]
        lines.append(json.dumps({
            "id": ex.id, "question": ex.question, "gold": ex.answer, "answer_class": task.answer_class(ex.answer),
            "greedy": greedy_rows[i][2], "greedy_correct": bool(greedy_ok[i]),
            "greedy_token_ids": greedy_rows[i][1],
            "samples": [r[2] for r in rows], "samples_correct": [bool(c) for c in sample_ok[i]],
            "sample_token_ids": [r[1] for r in rows],
        }, ensure_ascii=False))
    atomic_write_text(out / "problems.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(out / "results.json", results)
