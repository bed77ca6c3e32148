"""MATH-style answer checking: the last ``\\boxed{}`` and a time-bounded math-verify equivalence.

math-verify's own timeout uses ``signal.alarm`` and so only works on the main thread. Here every
math-verify call runs in a persistent subprocess worker (`_mv_worker.py`, started with
``subprocess``, not ``multiprocessing``, so a training script is never re-imported); the caller
waits on a pipe until a deadline and, if it passes, kills the worker and starts a replacement. That
bounds a check's wall time from any thread. Cheap checks (string normalisation, plain numbers,
length caps) run first and never touch sympy. Nothing here raises on any input: errors mean False.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from tokentrust.verifiers.failures import Kind, record_failure

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # longer gold/pred answers are "not equal" without calling sympy
MAX_BOXED_CHARS = 4096  # last_boxed gives up on longer boxed contents
MAX_BOXED_DEPTH = 64  # ... and on deeper brace nesting
_WORKER = str(Path(__file__).with_name("_mv_worker.py"))


# ----------------------------------------------------------------------------- extraction

def last_boxed(text: str, max_chars: int = MAX_BOXED_CHARS, max_depth: int = MAX_BOXED_DEPTH) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in `text`.

    Returns None when there is none, or when the last one is unbalanced, deeper than `max_depth`
    or longer than `max_chars` (a truncated or adversarial answer is no answer). Linear time.
    """
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i] == " ":  # "\boxed 5": one token up to whitespace or $
        m = re.match(r" +([^\s$]{1,64})", text[i:i + 80])
        return m.group(1) if m else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    j, end = i, min(len(text), i + max_chars + 2)
    while j < end:
        c = text[j]
        if c == "\\":  # skip escaped characters such as \{ and \} (set braces)
            j += 2
            continue
        if c == "{":
            depth += 1
            if depth > max_depth:
                return None
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


# ----------------------------------------------------------------------------- fast path

_SPACE_CMDS = re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])|\\displaystyle|\\(?:left|right)(?![a-zA-Z])|~|\s+")
_PLAIN_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def normalize_answer(s: str) -> str:
    """Cheap LaTeX normalisation for the exact-match fast path (not an equivalence checker)."""
    s = s.strip().strip("$")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("{,}", "")
    s = _SPACE_CMDS.sub("", s)
    return s.rstrip(".")


def _balanced(s: str) -> bool:
    """Unescaped braces pair up (so wrapping the answer in ``\\boxed{...}`` cannot change its meaning)."""
    depth, j = 0, 0
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return False
        j += 1
    return depth == 0


def _plain_number(s: str) -> Fraction | None:
    if len(s) <= 64 and _PLAIN_NUMBER.fullmatch(s):
        return Fraction(s)
    return None


# ----------------------------------------------------------------------------- worker pool

class _Worker:
    """One worker subprocess (`_mv_worker.py` here) and its line-buffered pipe. ``failure`` says why
    the last call got no answer: "timeouts" (deadline passed) or "errors" (dead, garbage, broken pipe)."""

    script = _WORKER

    def __init__(self, memory_mb: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", self.script, str(memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            bufsize=0, close_fds=True,
        )
        self.ready = False
        self.failure: Kind = "errors"
        self._buf = b""
        self._next_id = 0

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            r = select.select([fd], [], [], remaining)[0] if remaining > 0 else []
            if not r:
                self.failure = "timeouts"
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.failure = "errors"
                return None  # the worker died
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def wait_ready(self, deadline: float) -> bool:
        if not self.ready:
            line = self._readline(deadline)
            self.ready = line is not None and b"ready" in line
            if line is not None and not self.ready:
                self.failure = "errors"
        return self.ready

    def request(self, payload: dict, deadline: float) -> dict | None:
        """Send ``payload`` (plus an id and the worker's own time budget) and return the answer, or
        None if the worker missed ``deadline`` or failed (``failure`` says which)."""
        self._next_id += 1
        budget = max(0.05, 0.75 * (deadline - time.monotonic()))  # worker's own timer fires first
        req = json.dumps({**payload, "id": self._next_id, "budget": budget}) + "\n"
        try:
            self.proc.stdin.write(req.encode("utf-8", "surrogatepass"))
        except (OSError, ValueError):
            self.failure = "errors"
            return None
        while True:
            line = self._readline(deadline)
            if line is None:
                return None
            try:
                msg = json.loads(line)
            except ValueError:
                self.failure = "errors"
                return None
            if msg.get("id") == self._next_id:
                return msg

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


class MathVerifier:
    """A pool of math-verify subprocess workers; `equal` is time-bounded from any thread.

    `num_workers` (default 2) lets a second, warm worker serve while a killed one restarts, so a
    timeout does not make the next check wait for a worker start-up. `memory_mb` caps each worker's
    address space (runaway big-integer powers fail fast with MemoryError instead of swapping).
    """

    def __init__(self, num_workers: int = 2, startup_timeout_s: float = 60.0, memory_mb: int = 3072):
        self.num_workers = max(1, int(num_workers))
        self.startup_timeout_s = startup_timeout_s
        self.memory_mb = memory_mb
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._pid = os.getpid()
        self.timeouts = 0  # checks that ran out of time (the worker's timer, or the deadline: then replaced)
        self.errors = 0  # checks whose worker died, answered garbage or did not start (replaced)

    # workers are started lazily, all at once, and replaced one for one
    def _spawn(self) -> None:
        w = _Worker(self.memory_mb)
        with self._lock:
            self._all.add(w)
        self._idle.put(w)

    def _ensure_started(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        for _ in range(self.num_workers):
            self._spawn()

    def warmup(self) -> bool:
        """Start the workers and wait until all have imported math-verify."""
        self._ensure_started()
        deadline = time.monotonic() + self.startup_timeout_s
        taken = []
        ok = True
        for _ in range(self.num_workers):
            try:
                w = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            ok = w.wait_ready(deadline) and ok
            taken.append(w)
        for w in taken:
            self._idle.put(w)
        return ok

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all]

    def equal(self, gold: str, pred: str, timeout_s: float = 2.0) -> bool:
        """Is `pred` mathematically equal to `gold`? math-verify ``verify(parse(gold), parse(pred))``.

        The math-verify part takes at most `timeout_s` of wall time (plus a worker start-up, paid
        once, and after a timeout only if every worker timed out). Never raises.
        """
        try:
            return self._equal(gold, pred, timeout_s)
        except Exception:
            log.debug("math_equal failed", exc_info=True)
            record_failure("errors", self)
            return False

    def _equal(self, gold: str, pred: str, timeout_s: float) -> bool:
        if not isinstance(gold, str) or not isinstance(pred, str):
            return False
        if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
            return False
        g, p = normalize_answer(gold), normalize_answer(pred)
        if not g or not p:
            return False
        if g == p:
            return True
        gn, pn = _plain_number(g), _plain_number(p)
        if gn is not None and pn is not None:
            return gn == pn
        if not _balanced(gold) or not _balanced(pred):
            return False
        if self._closed or os.getpid() != self._pid:  # closed, or we are a fork of the owner
            return False
        self._ensure_started()
        try:
            w = self._idle.get(timeout=self.startup_timeout_s + 4 * timeout_s)
        except queue.Empty:  # no worker came free in time
            record_failure("timeouts", self)
            return False
        msg = None
        try:
            if w.wait_ready(time.monotonic() + self.startup_timeout_s):
                msg = w.request({"gold": gold, "pred": pred}, time.monotonic() + timeout_s)
        finally:
            if msg is None:  # deadline, crash or failed start: count it, replace the worker
                record_failure(w.failure, self)
                w.kill()
                with self._lock:
                    self._all.discard(w)
                if not self._closed:
                    self._spawn()
            else:
                self._idle.put(w)
        if msg is None:
            return False
        if msg.get("timeout"):  # the worker's own timer fired: no verdict, but the worker lives on
            record_failure("timeouts", self)
        return bool(msg.get("ok"))

    def close(self) -> None:
        """Kill every worker and wait for it; later calls to `equal` use only the fast path."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        if os.getpid() != self._pid:
            return
        for w in workers:
            w.kill()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier used by `math_equal` (re-created after `close()` or a fork)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed or _default._pid != os.getpid():
            _default = MathVerifier()
        return _default


def math_equal(gold: str, pred: str, timeout_s: float = 2.0) -> bool:
    """math-verify equivalence of two answer strings (e.g. boxed contents), gold first. Never raises."""
    return default_verifier().equal(gold, pred, timeout_s)


def close() -> None:
    """Shut down the default verifier's workers (also registered with atexit)."""
    global _default
    with _default_lock:
        v, _default = _default, None
    if v is not None:
        v.close()


atexit.register(close)
