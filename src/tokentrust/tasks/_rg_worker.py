"""Subprocess worker for `tokentrust.tasks.rg`: scores answers with reasoning-gym's ``score_answer``.

Started as ``python -P _rg_worker.py MEMORY_MB``. Protocol: it writes ``{"ready": true}`` once
reasoning-gym is imported, then reads JSON lines ``{"id", "dataset", "options", "seed", "size",
"index", "question", "answer", "budget"}`` and answers ``{"id", "score"}`` (plus ``"timeout": true``
when its own timer ended the call, or ``"mismatch": true`` when the regenerated entry's question
differs from the one sent). Datasets are procedural, so the
worker rebuilds the entry from (dataset, options, seed, size, index) instead of receiving it. The
parent's deadline-and-kill bounds each call; the interval timer and memory cap only let the worker
recover without a restart.
"""

import json
import logging
import signal
import sys

from tokentrust.verifiers._mv_worker import _Deadline, _harden, _on_alarm


def _score(datasets: dict, req: dict) -> dict | None:
    """``{"score": s}`` (plus ``"timeout": true`` when the budget ran out first), None on a mismatch."""
    import reasoning_gym

    key = json.dumps([req["dataset"], req["options"], req["seed"], req["size"]], sort_keys=True)
    if key not in datasets:
        datasets[key] = reasoning_gym.create_dataset(req["dataset"], seed=req["seed"], size=req["size"],
                                                     **req["options"])
    ds = datasets[key]
    entry = ds[req["index"]]
    if entry["question"] != req["question"]:
        return None
    signal.setitimer(signal.ITIMER_REAL, max(float(req["budget"]), 0.01))
    try:
        score = float(ds.score_answer(req["answer"], entry))
    except _Deadline:
        return {"score": 0.0, "timeout": True}
    except BaseException:  # whatever the scorer raises on a malformed answer
        score = 0.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"score": score if score == score else 0.0}  # NaN -> 0


def main() -> None:
    _harden(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    logging.disable(logging.CRITICAL)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import reasoning_gym  # noqa: F401  (imported before "ready", so the first deadline is not spent on it)

    datasets: dict = {}
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        rid, msg = None, {"score": 0.0}
        try:
            req = json.loads(line)
            rid = req.get("id")
            scored = _score(datasets, req)
            msg = {"score": 0.0, "mismatch": True} if scored is None else scored
        except BaseException:
            pass
        out.write(json.dumps({"id": rid, **msg}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
