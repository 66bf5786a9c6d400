"""Graceful preemption: a signal makes the run stop at a step boundary with a checkpoint.

SLURM warns a job before it takes the nodes away (``#SBATCH --signal=B:USR1@120``, a
preemption with ``preempt_send_user_signal``) and sends SIGTERM at preemption, time limit
and ``scancel``. On SIGUSR1, SIGTERM or SIGINT (Ctrl+C) the trainer

1. finishes the optimizer step it is in (the handler only sets a flag);
2. agrees with the other ranks: after every step one all-reduce (MAX) of the flag, so all
   ranks stop after the same step even when the signal reached them at different times,
   or reached only some of them;
3. writes a checkpoint at that step, mid-epoch (``TrainState.batch`` and the epoch's running
   sums), waits until every rank is past it, and
4. raises :class:`Preempted`; ``moe-dist`` exits with :data:`PREEMPTED_EXIT_CODE`.

The same command run again resumes from that checkpoint with no flags, and ends with the
parameters an uninterrupted run has. While ``fit()`` runs, SIGTERM therefore no longer ends
the process at once (a rank stuck in a collective needs SIGKILL, which SLURM sends after
``KillWait``). A second Ctrl+C, pressed more than a second after the first, interrupts at
once without a checkpoint (KeyboardInterrupt). Who requeues: the sbatch scripts (``slurm/``), after
SIGUSR1 only; which process gets which signal in each launch pattern: README, "SLURM".
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PREEMPTED_EXIT_CODE = 75
"""sysexits.h EX_TEMPFAIL: stopped early with a checkpoint; run the same command to continue."""

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
#: A second SIGINT this long after the first interrupts at once (KeyboardInterrupt, no
#: checkpoint): a user pressing Ctrl+C again. Sooner, it is the same Ctrl+C delivered twice
#: (the terminal signals the whole process group, and torchrun or a sweep passes it on too).
SECOND_INTERRUPT_AFTER_S = 1.0


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint (not an error)."""

    def __init__(self, signum: int, where: str, step: int | None = None) -> None:
        self.signum = signum
        self.step = step
        after = f" after step {step}" if step is not None else ""
        super().__init__(f"{signal.Signals(signum).name if signum else 'a signal'}: stopped{after}, "
                         f"checkpoint in {where}; run the same command to resume")


class PreemptionFlag:
    """Remembers the first SIGUSR1/SIGTERM while installed; :meth:`agreed` is the ranks' decision.

    Handlers can only be installed from the main thread; elsewhere (a trainer driven from a
    worker thread) the flag stays down and signals keep their previous handlers.
    """

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum = 0  # the first signal this process got
        self.agreed_signum = 0  # the last agreed() result
        self._on_signal = on_signal
        self._first_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No escalation on a second SIGUSR1/SIGTERM: SLURM and srun may both deliver the same one.
        now = time.monotonic()
        if signum == signal.SIGINT and self.signum and now - self._first_at > SECOND_INTERRUPT_AFTER_S:
            raise KeyboardInterrupt
        if not self.signum:
            self._first_at = now
        self.signum = self.signum or signum
        if self._on_signal is not None:
            self._on_signal(signum)

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def agreed(self, distributed: bool, device: torch.device) -> int:
        """The signal any rank got (0: none; also kept in ``agreed_signum``). Collective with
        several ranks: call it at the same point of every step on every rank."""
        signum = self.signum  # only the handler writes it
        if distributed:
            # imported here: `moe-dist` imports this module for its exit code, without torch
            from moe_dist.parallel import agree_max_int

            signum = agree_max_int(signum, device)
        self.agreed_signum = signum
        return signum


class SignalForwarder:
    """For a parent that runs training in child processes (``moe-dist sweep``): SIGUSR1 and
    SIGTERM go on to the running child, so the child checkpoints while the parent waits for
    it. A signal that arrives between children is remembered in ``signum`` (start no more).
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self._flag = PreemptionFlag(on_signal=self._forward)

    @property
    def signum(self) -> int:
        return self._flag.signum

    def _forward(self, signum: int) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def call(self, *args, **kwargs) -> int:
        """``subprocess.call`` whose child receives the forwarded signals."""
        with subprocess.Popen(*args, **kwargs) as child:
            self.child = child
            try:
                return child.wait()
            except BaseException:
                child.kill()
                raise
            finally:
                self.child = None

    def __enter__(self) -> SignalForwarder:
        self._flag.install()
        return self

    def __exit__(self, *exc) -> None:
        self._flag.uninstall()
