"""``moe-dist tensorboard RUN_DIR``: TensorBoard on a run folder (or a folder of runs).

Bound to 127.0.0.1 unless ``--host`` says otherwise (docs/design.md: serve locally; reach it from
another machine through ``ssh -L 6006:127.0.0.1:6006``). Served by TensorBoard's own
program API, so every plugin works: the trainer's scalars (``train/*``, ``eval/*``, ``moe/*``,
``perf/step_seconds/*``), the selection-table images and the hparams table.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from moe_dist.errors import MoEDistError

__all__ = ["serve", "register"]


def serve(logdir: str | Path, host: str = "127.0.0.1", port: int = 6006) -> None:
    """Serve ``logdir`` until interrupted."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise MoEDistError(f"{logdir} is not a folder (give a run_dir or a folder of runs)")
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=["tensorboard", "--logdir", str(logdir), "--host", host, "--port", str(port)])
    try:
        url = board.launch()  # serves in a daemon thread
    except program.TensorBoardServerException as exc:  # e.g. the port is taken
        raise MoEDistError(f"TensorBoard did not start: {' '.join(exc.msg.split())}") from None
    print(f"TensorBoard {logdir} at {url} (Ctrl+C to quit)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


def cmd_tensorboard(args: argparse.Namespace) -> int:
    serve(args.run_dir, args.host, args.port)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("tensorboard", help="serve a run folder (or a folder of runs) with TensorBoard")
    p.add_argument("run_dir", help="run folder, or a folder of run folders")
    p.add_argument("--port", type=int, default=6006, help="port (default 6006)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.set_defaults(func=cmd_tensorboard)
