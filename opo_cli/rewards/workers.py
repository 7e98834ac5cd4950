"""The math-verify worker pool: grading subprocesses that a case over its time limit kills.

Each worker is `python -c "...; _serve_worker()"` in its own session, reading one JSON
`[pred, gold, soft_s]` per line and answering "1" or "0". The parent (`_Pool.run`) hands
cases to idle workers, waits on their pipes, and kills and replaces any worker past its
case's deadline, so a pathological answer (say `9^{9^{9^{9}}}`, which sympy tries to expand
inside C code no signal can interrupt) costs one case, never the run. Only the workers import
sympy; the parent never evaluates model text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

log = logging.getLogger(__name__)

_WORKER_MEMORY_BYTES = 4 << 30  # a worker building a 10^9-digit integer dies, not the host
_WORKER_CPU_S = 60  # CPU seconds per case after which the kernel ends a worker (if orphaned)


def _set_soft_limit(name: str, value: int) -> None:
    """Lower the soft resource limit `name` (RLIMIT_AS, ...) of this process, where supported."""
    with contextlib.suppress(ImportError, AttributeError, ValueError, OSError):
        import resource

        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        resource.setrlimit(kind, (value if hard < 0 else min(value, hard), hard))


def _cap_cpu_for_next_case() -> None:
    """The parent kills an overrunning worker; if the parent is gone, the kernel does (SIGXCPU)."""
    with contextlib.suppress(ImportError):
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF)
        _set_soft_limit("RLIMIT_CPU", math.ceil(used.ru_utime + used.ru_stime) + _WORKER_CPU_S)


def _verify(pred: str, gold: str, soft_s: int) -> bool:
    """math-verify on two answers (runs in a worker: main thread, so its signal timeouts work)."""
    from latex2sympy2_extended.math_normalization import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    # math-verify's defaults but for units=False: its unit list holds single letters (c, d, g,
    # h, l, m, o, s, t), so 4t would read as 4 with the unit t; _strip_unit does units here
    norm = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True)
    cfg = [LatexExtractionConfig(boxed_match_priority=0, normalization_config=norm)]
    gold_p = parse(f"$\\boxed{{{gold}}}$", cfg, parsing_timeout=soft_s)
    pred_p = parse(f"$\\boxed{{{pred}}}$", cfg, parsing_timeout=soft_s)
    return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=soft_s))


def _serve_worker() -> None:
    """Subprocess entry point: one JSON [pred, gold, soft_s] per stdin line, "1"/"0" back."""
    out = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the verdict stream
    _set_soft_limit("RLIMIT_AS", _WORKER_MEMORY_BYTES)
    from math_verify.errors import TimeoutException

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # timeouts are expected, not news
    os.write(out, b"ready\n")
    for line in sys.stdin.buffer:
        _cap_cpu_for_next_case()
        try:
            ok = _verify(*json.loads(line))
        except (Exception, TimeoutException):
            ok = False
        os.write(out, b"1\n" if ok else b"0\n")


class _Worker:
    """One grading subprocess, in its own session so a Ctrl-C in the terminal does not hit it."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable,
            "-c",
            "from opo_cli.rewards.workers import _serve_worker; _serve_worker()",
        ]
        self.proc = subprocess.Popen(  # cwd=root: "-c" puts the cwd first on sys.path
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
            start_new_session=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.ready = False

    def send(self, pred: str, gold: str, soft_s: int) -> bool:
        try:
            self.proc.stdin.write(json.dumps([pred, gold, soft_s]).encode() + b"\n")
            self.proc.stdin.flush()
            return True
        except OSError:
            return False

    def read(self) -> bytes:
        """The next message ("ready", "1", "0"); b"" when the worker has died."""
        try:
            return os.read(self.fd, 64).strip()
        except OSError:
            return b""

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


_STARTUP_S = 30.0  # slack for starting workers (importing sympy) before the first verdict
_RESPAWN_S = 5.0  # slack per round for replacing a killed worker


class _Pool:
    """Grading workers that take one case at a time; a case over its time limit kills its worker."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.workers: list[_Worker] = []

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers[self.workers.index(w)] = _Worker()

    def _drop(self, w: _Worker) -> None:
        log.warning("a math grading worker died on start-up (is math-verify installed?)")
        w.kill()
        self.workers.remove(w)

    def run(self, cases: list[tuple[str, str]], timeout_s: float) -> list[bool]:
        """Verdicts of math-verify on (pred, gold) cases; False for any that overran timeout_s."""
        self.workers += [_Worker() for _ in range(self.size - len(self.workers))]
        verdicts = [False] * len(cases)
        todo = deque(range(len(cases)))
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (case, deadline)
        rounds = math.ceil(len(cases) / self.size)
        give_up = time.monotonic() + _STARTUP_S + rounds * (timeout_s + _RESPAWN_S)
        soft_s = max(1, int(timeout_s) - 1)  # math-verify's own signal timeout, inside the worker
        try:
            while (todo or busy) and self.workers and time.monotonic() < give_up:
                self._dispatch(cases, todo, busy, timeout_s, soft_s)
                self._collect(verdicts, busy, give_up)
                for w, (_, deadline) in list(busy.items()):
                    if time.monotonic() >= deadline:
                        del busy[w]
                        self._replace(w)
        finally:  # past give_up, or interrupted: a busy worker would answer the next batch late
            for w in busy:
                self._replace(w)
        return verdicts

    def _dispatch(self, cases: list, todo: deque, busy: dict, timeout_s: float, soft_s: int):
        """Hand the next cases to the idle, ready workers; start each case's clock."""
        for w in self.workers:
            if w.ready and w not in busy and todo:
                i = todo.popleft()
                if w.send(*cases[i], soft_s):
                    busy[w] = (i, time.monotonic() + timeout_s)
                else:
                    self._replace(w)

    def _collect(self, verdicts: list[bool], busy: dict, give_up: float) -> None:
        """Wait for the next message or deadline; record verdicts, readiness and deaths."""
        waiting = {w.fd: w for w in self.workers if not w.ready or w in busy}
        until = min([d for _, d in busy.values()] + [give_up])
        ready_fds = wait(list(waiting), max(0.0, until - time.monotonic()))  # poll: no fd limit
        for fd in ready_fds:
            w, msg = waiting[fd], waiting[fd].read()
            if msg == b"ready":
                w.ready = True
            elif msg in (b"1", b"0") and w in busy:
                verdicts[busy.pop(w)[0]] = msg == b"1"
            else:  # died: out of memory, crashed, or never started
                busy.pop(w, None)
                if w.ready:
                    self._replace(w)
                else:
                    self._drop(w)
