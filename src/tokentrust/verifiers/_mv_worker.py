"""Subprocess worker for `tokentrust.verifiers.math`: runs math-verify on one request per line.

Started as ``python -P _mv_worker.py MEMORY_MB`` (``-P`` keeps this folder, which holds a
``math.py``, off ``sys.path``). Protocol: it writes ``{"ready": true}`` once imports are done, then
reads JSON lines ``{"id", "gold", "pred", "budget"}`` and answers ``{"id", "ok"}`` (plus
``"timeout": true`` when its own timer ended the check). It never evaluates its input: math-verify
parses LaTeX into sympy objects. Its own guards (an interval timer for the Python-level work, an
address-space cap for runaway big integers, death with the parent) only make it recover without a
restart; the parent's deadline-and-kill is what bounds a check's time.
"""

import json
import logging
import signal
import sys


class _Deadline(BaseException):
    """Raised by the interval timer; a BaseException so math-verify's `except Exception` can't eat it."""


def _on_alarm(signum, frame):
    raise _Deadline()


def _harden(memory_mb: int) -> None:
    try:  # die with the parent (Linux only)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if memory_mb > 0:
        try:
            import resource

            cap = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        except Exception:
            pass


def _check(parse, verify, config, gold: str, pred: str, budget: float) -> dict:
    """``{"ok": verdict}``, plus ``"timeout": true`` when the budget ran out first (then ok is False)."""
    signal.setitimer(signal.ITIMER_REAL, max(budget, 0.01))
    try:
        g = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=None)
        p = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
        return {"ok": bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))}
    except _Deadline:
        return {"ok": False, "timeout": True}
    except BaseException:  # MemoryError, RecursionError, anything sympy raises: not equal
        return {"ok": False}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    _harden(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    logging.disable(logging.CRITICAL)  # math-verify logs whole inputs on timeouts
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the parent's terminal: the parent decides
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]  # LaTeX only: math-verify's plain-expression path uses sympy's parse_expr (eval)

    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            verdict = _check(parse, verify, config, str(req["gold"]), str(req["pred"]), float(req["budget"]))
            rid = req.get("id")
        except BaseException:
            verdict, rid = {"ok": False}, None
        out.write(json.dumps({"id": rid, **verdict}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
