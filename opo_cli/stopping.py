"""Clean early stops of a training run: a signal (SIGINT, SIGTERM) or too many bad steps.

Either way the loop finishes the step it is in, writes a checkpoint and raises `RunStopped`,
whose message says where the run resumes from and whose `exit_code` the CLI exits with:
130 after SIGINT, 143 after SIGTERM (the shell's 128 + signal number), 3 after
`trainer.max_bad_steps` steps in a row whose optimizer updates were all skipped (a
non-finite loss or gradient). A second signal stops at once, as it would without `opo`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

BAD_STEPS_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run stopped early with a checkpoint; the CLI prints the message and exits."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(RunStopped):
    """SIGINT or SIGTERM: the run can go on from its checkpoint with the same command."""


class Diverged(RunStopped):
    """`trainer.max_bad_steps` steps in a row whose updates were all skipped."""

    def __init__(self, message: str):
        super().__init__(message, BAD_STEPS_EXIT_CODE)


class SignalStop:
    """While active, a first SIGINT or SIGTERM only records a stop request; a second acts.

    `with SignalStop() as stop: ... if stop.signum: ...`. Handlers are installed only in the
    main thread (Python allows nowhere else), never over an ignored signal, and the previous
    ones are put back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # `cmd &` in a script ignores ^C
                self._previous[signum] = signal.signal(signum, self._request) or signal.SIG_DFL
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # the next one acts at once

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


class BadStepCounter:
    """Counts steps in a row whose updates were all skipped; trips at `limit` (0: never)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def update(self, skipped_updates: int, updates: int) -> bool:
        """Count one step; True when the run should stop."""
        self.in_a_row = self.in_a_row + 1 if skipped_updates >= updates else 0
        return self.limit > 0 and self.in_a_row >= self.limit
