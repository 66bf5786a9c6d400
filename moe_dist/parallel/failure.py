"""A collective that failed because another rank died or hangs, as one line that names it.

gloo raises a plain ``RuntimeError`` in the rank that waited: ``Timed out waiting 30000ms for
recv operation to complete`` after the group's timeout (a peer that is stopped, or stuck in
I/O or a driver), ``Connection closed by peer`` at once when a peer's process is gone
(docs/launching.md, T7). Neither names the collective nor the code that called it, so
:func:`collective_failure` reads them from the traceback: the ``torch.distributed`` function
and the first caller outside the named-collective wrappers of ``comm``. NCCL reports its
timeouts from a watchdog that aborts the process, which no Python code sees.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType

import torch.distributed as dist

from moe_dist.errors import CollectiveError
from moe_dist.parallel.env import group_timeout, world_info_from_env

__all__ = ["collective_failure"]

_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe", re.IGNORECASE)
_TORCH = f"{Path(dist.__file__).parents[1]}/"
_TORCH_DISTRIBUTED = f"{Path(dist.__file__).parent}/"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding moe_dist/
_WRAPPERS = (str(Path(__file__).with_name("comm.py")),)  # thin named collectives: name their caller


def _frames(tb: TracebackType | None) -> list[tuple[str, str, int]]:
    """(file, qualified function name, line) of each frame, outermost first."""
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((code.co_filename, getattr(code, "co_qualname", code.co_name), tb.tb_lineno))
        tb = tb.tb_next
    return frames


def _where(exc: BaseException) -> str | None:
    """``all_reduce in PreemptionFlag.agreed, moe_dist/train/preemption.py:108``: the
    torch.distributed collective that raised and the code that asked for it; None when no
    torch.distributed frame is on the traceback (not a collective's error)."""
    frames = _frames(exc.__traceback__)
    first = next((i for i, (path, _, _) in enumerate(frames) if path.startswith(_TORCH_DISTRIBUTED)), None)
    if first is None:
        return None
    # torch wraps its collectives in loggers (c10d_logger's ``wrapper``): the innermost
    # torch.distributed function that is not a wrapper is the collective itself.
    names = [name for path, name, _ in frames[first:] if path.startswith(_TORCH_DISTRIBUTED)]
    collective = next((n for n in reversed(names) if "wrapper" not in n), names[-1]).rpartition(".")[2]
    callers = [f for f in frames[:first] if not f[0].startswith(_TORCH) and f[0] not in _WRAPPERS]
    if not callers:
        return collective
    path, name, line = callers[-1]
    try:
        shown = Path(path).resolve().relative_to(_PACKAGE_ROOT)
    except ValueError:
        shown = Path(path).name
    return f"{collective} in {name.replace('.<locals>', '')}, {shown}:{line}"


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return world_info_from_env().rank


def collective_failure(exc: BaseException) -> CollectiveError | None:
    """The one-line error for ``exc`` when it is a collective that timed out or lost a peer
    (torch's ``DistError`` types and gloo's plain ``RuntimeError``); None for anything else."""
    if not isinstance(exc, RuntimeError):
        return None
    message = str(exc)
    where = _where(exc)
    if where is None and not isinstance(exc, dist.DistError):
        return None
    what = f"rank {_rank()}: a collective ({where or 'torch.distributed'})"
    if _TIMED_OUT.search(message):
        timeout = group_timeout()
        limit = (f"parallel.timeout_s={timeout.total_seconds():g} s" if timeout is not None
                 else "the process group's timeout")
        return CollectiveError(f"{what} waited longer than {limit} for the other ranks: one of them died or hangs")
    if _PEER_GONE.search(message):
        return CollectiveError(f"{what} lost its connection to another rank: that rank died or "
                               "stopped with an error of its own")
    return None
