"""The launch scripts (``launchers/*.sh``), their preflight checks and ``moe-dist tensorboard``.

* Preflight: a launch that cannot work stops before any process starts, with one exact line.
* Multi-node, on this machine: ``launchers/multi_node.sh`` run twice (NODE_RANK 0 and 1,
  one gloo process each, 127.0.0.1) with the accelerate and the torchrun launcher trains
  exactly like ``launchers/cpu.sh`` with two processes on one machine (docs/launching.md).
* TensorBoard: a two-process run writes one event stream, with every rank's step time; the
  real server serves a run's scalars and images through its HTTP data API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from moe_dist.errors import ConfigError
from moe_dist.launch import LaunchPlan, preflight
from procs import free_port
from test_parallel import LAUNCH_ENV, assert_same_run, mnist_overrides

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = REPO / "launchers"

# ----------------------------------------------------------------------------- preflight

EP2 = ("moe.num_experts=4", "parallel.ep_size=2")
NO_GPU = "this launcher needs a CUDA GPU and torch finds none on this machine; " \
         "use launchers/cpu.sh (or DEVICE=cpu) to run on CPU processes"


@pytest.mark.parametrize("plan,gpus,message", [
    (LaunchPlan(device="cpu", num_processes=3, overrides=EP2), 0,
     "parallel.ep_size=2 does not divide the world size 3: launch a multiple of 2 processes"),
    (LaunchPlan(device="cuda", num_processes=1, num_machines=3, overrides=EP2), 1,
     "parallel.ep_size=2 does not divide the world size 3: launch a multiple of 2 processes"),
    (LaunchPlan(device="cpu", num_processes=1, overrides=EP2), 0,
     "parallel.ep_size=2 does not divide the world size 1: launch a multiple of 2 processes"),
    (LaunchPlan(device="cuda", num_processes=1), 0, NO_GPU),
    (LaunchPlan(device="cuda", num_processes=0), 0, NO_GPU),
    (LaunchPlan(device="cuda", num_processes=4), 2, "NUM_PROCESSES=4 exceeds the 2 GPUs of this machine "
                                                    "(one process per GPU)"),
    (LaunchPlan(device="cpu", num_processes=0), 0,
     "NUM_PROCESSES=0 means one process per GPU; DEVICE=cpu needs a number of processes"),
    (LaunchPlan(device="cpu", num_processes=1, num_machines=2, node_rank=2), 0,
     "NODE_RANK=2 is outside 0..1 (NUM_MACHINES=2)"),
    (LaunchPlan(device="cpu", num_processes=1, main_port=0), 0, "MAIN_PORT=0 is not a port number (1-65535)"),
    (LaunchPlan(device="cpu", launcher="mpirun"), 0, "LAUNCHER='mpirun' is not one of: accelerate, torchrun"),
    (LaunchPlan(device="tpu"), 0, "DEVICE='tpu' is not one of: cuda, cpu"),
    (LaunchPlan(device="cpu", num_processes=2, overrides=("engine=deepspeed", "parallel.zero_stage=3")), 0,
     "parallel.zero_stage=3 must be 0, 1 or 2 (DeepSpeed's MoE does not support ZeRO-3)"),
    (LaunchPlan(device="cpu", num_processes=6, overrides=("parallel.ep_size=6", "moe.num_experts=5")), 0,
     "parallel.ep_size=6 exceeds moe.num_experts=5: every expert-parallel rank must hold at least one expert"),
    (LaunchPlan(device="cpu", num_processes=2,
                overrides=("engine=deepspeed", "parallel.ep_size=2", "moe.num_experts=5")), 0,
     "engine=deepspeed needs moe.num_experts=5 divisible by parallel.ep_size=2; "
     "engine=moe_dist places uneven expert blocks"),
    (LaunchPlan(device="cpu", overrides=("train.epoch=3",)), 0, "override: unknown key 'train.epoch'; "
                                                                "did you mean train.epochs? (moe-dist config keys lists every key)"),
    (LaunchPlan(device="cpu", config="/no/such.yaml"), 0, "config file /no/such.yaml does not exist"),
])
def test_preflight_stops_an_impossible_launch_with_one_line(plan, gpus, message):
    with pytest.raises(ConfigError) as error:
        preflight(plan, gpu_count=gpus)
    assert str(error.value) == message


def test_preflight_refuses_accelerates_deepspeed_plugin(tmp_path):
    config = tmp_path / "ds.yaml"
    config.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n")
    with pytest.raises(ConfigError, match=r"^ACCELERATE_CONFIG=.*ds.yaml selects accelerate's DeepSpeed "
                                          r"plugin; use launchers/deepspeed.sh \(engine=deepspeed"):
        preflight(LaunchPlan(device="cpu", accelerate_config=str(config)))
    with pytest.raises(ConfigError, match="ACCELERATE_CONFIG=/no/such.yaml does not exist"):
        preflight(LaunchPlan(device="cpu", accelerate_config="/no/such.yaml"))


def test_preflight_resolves_the_processes_per_machine():
    assert preflight(LaunchPlan(device="cuda", num_processes=0), gpu_count=4) == 4  # one per GPU
    assert preflight(LaunchPlan(device="cuda", num_processes=2, overrides=EP2),
                     gpu_count=4) == 2
    assert preflight(LaunchPlan(device="cpu", num_processes=2, num_machines=2, node_rank=1,
                                overrides=("parallel.ep_size=4", "moe.num_experts=8"))) == 2
    for name in ("accelerate/one_gpu.yaml", "accelerate/multi_gpu.yaml", "accelerate/multi_node.yaml",
                 "accelerate/cpu.yaml"):
        preflight(LaunchPlan(device="cpu", num_processes=1, accelerate_config=str(LAUNCHERS / name)))


def script_env(**env: str) -> dict[str, str]:
    """The environment of a launch script: this interpreter, this checkout, loopback gloo."""
    return {**os.environ, **LAUNCH_ENV, "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}


GPU_SCRIPTS = [("one_gpu.sh", {}), ("multi_gpu.sh", {}), ("multi_node.sh", {}),
               ("deepspeed.sh", {"ZERO_STAGE": "2"})]


@pytest.mark.parametrize("script,env,message", [
    *[pytest.param(s, e, f"{s}: error: {NO_GPU}", id=s,
                   marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"))
      for s, e in GPU_SCRIPTS],
    pytest.param("cpu.sh", {"NUM_PROCESSES": "3", "EP_SIZE": "2"},
                 "cpu.sh: error: parallel.ep_size=2 does not divide the world size 3: "
                 "launch a multiple of 2 processes", id="cpu.sh-ep_size"),
    pytest.param("multi_node.sh", {"DEVICE": "cpu", "NUM_PROCESSES": "1", "NUM_MACHINES": "3", "EP_SIZE": "2"},
                 "multi_node.sh: error: parallel.ep_size=2 does not divide the world size 3: "
                 "launch a multiple of 2 processes", id="multi_node.sh-ep_size"),
])
def test_launch_scripts_stop_before_training(tmp_path, script, env, message):
    run = tmp_path / "run"
    proc = subprocess.run(["bash", str(LAUNCHERS / script), f"run_dir={run}", "train.epochs=1"],
                          env=script_env(**env), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [message]
    assert proc.stdout == "" and not run.exists()


# ----------------------------------------------------------------------------- launched runs


def start(script: str, overrides: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(LAUNCHERS / script), *overrides], env=script_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=cwd)


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for every launcher; on a timeout or a failure kill only their process groups."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
        pytest.fail("launch timed out:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
    for proc, out in zip(procs, outputs):
        if proc.returncode != 0:
            for other in procs:
                if other.poll() is None:
                    os.killpg(other.pid, 9)
            pytest.fail(f"launcher exited with {proc.returncode}:\n{out[-5000:]}")
    return outputs


def run_overrides(run: Path, root: str) -> list[str]:
    """test_parallel's seconds-long MNIST MoE run, experts sharded over both processes."""
    return mnist_overrides(run, root)


def config_file(tmp: Path) -> str:
    path = tmp / "defaults.yaml"
    path.write_text("# every key at its default; the test's overrides follow\n")
    return str(path)


@pytest.fixture(scope="module")
def one_machine_run(tmp_path_factory, data_root) -> Path:
    """``NUM_PROCESSES=2 EP_SIZE=2 launchers/cpu.sh``: the single-machine two-process reference."""
    tmp = tmp_path_factory.mktemp("cpu2")
    run = tmp / "run"
    env = {"CONFIG": config_file(tmp), "NUM_PROCESSES": "2", "EP_SIZE": "2", "MAIN_PORT": str(free_port())}
    wait_all([start("cpu.sh", run_overrides(run, data_root), env, tmp)])
    return run


def assert_same_weights(run: Path, reference: Path) -> None:
    from moe_dist.train.checkpoint import load_checkpoint

    ours = load_checkpoint(run / "checkpoints")["model"]
    ref = load_checkpoint(reference / "checkpoints")["model"]
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_machines_train_like_one_machine(one_machine_run, data_root, tmp_path, launcher):
    """multi_node.sh on two "machines" (NODE_RANK 0 and 1 on 127.0.0.1, one process each,
    experts sharded across them) gives the single-machine two-process run's history and weights."""
    run = tmp_path / "run"
    env = {"CONFIG": config_file(tmp_path), "DEVICE": "cpu", "LAUNCHER": launcher, "NUM_MACHINES": "2",
           "NUM_PROCESSES": "1", "EP_SIZE": "2", "MAIN_ADDR": "127.0.0.1", "MAIN_PORT": str(free_port()),
           "RDZV_TIMEOUT": "60"}
    wait_all([start("multi_node.sh", run_overrides(run, data_root), {**env, "NODE_RANK": str(rank)}, tmp_path)
              for rank in (0, 1)])
    result = json.loads((run / "metrics.json").read_text())
    reference = json.loads((one_machine_run / "metrics.json").read_text())
    assert result["num_processes"] == 2 and result["ep_size"] == 2
    assert_same_run(result, reference, 3)
    assert result["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-6)
    assert result["selection_table"] == reference["selection_table"]
    assert_same_weights(run, one_machine_run)


@pytest.mark.multiprocess
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_launcher_zero2_trains_like_the_accelerate_engine(one_machine_run, data_root, tmp_path):
    """deepspeed.sh (ZeRO 2, two CPU processes, ep_size 2) follows the same trajectory."""
    run = tmp_path / "run"
    env = {"CONFIG": config_file(tmp_path), "DEVICE": "cpu", "ZERO_STAGE": "2", "NUM_PROCESSES": "2",
           "EP_SIZE": "2", "MAIN_PORT": str(free_port()), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    [out] = wait_all([start("deepspeed.sh", run_overrides(run, data_root), env, tmp_path)])
    result = json.loads((run / "metrics.json").read_text())
    assert result["engine"] == "deepspeed" and result["num_processes"] == 2
    # warnings a user cannot act on are silenced where they arise (deepspeed_engine.py)
    assert "FutureWarning" not in out and "all_gather_into_tensor" not in out, out[-3000:]
    assert_same_run(result, json.loads((one_machine_run / "metrics.json").read_text()), 3)


# ----------------------------------------------------------------------------- TensorBoard


@pytest.mark.multiprocess
def test_a_two_process_run_writes_one_event_stream_with_every_ranks_step_time(one_machine_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(one_machine_run.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events  # the main rank's, hparams included
    board = EventAccumulator(str(events[0]))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    per_rank = [f"perf/step_seconds/rank{r}" for r in (0, 1)]
    assert {*per_rank, "perf/step_seconds/max", "perf/step_seconds/mean", "train/loss"} <= tags
    assert "perf/step_seconds/rank2" not in tags and "hparam/test_error" in tags
    for tag in (*per_rank, "perf/step_seconds/max", "perf/step_seconds/mean"):
        assert [e.step for e in board.Scalars(tag)] == [1, 2, 3], tag  # one value per epoch, from 1
    epoch_seconds = [e.value for e in board.Scalars("train/epoch_seconds")]
    for epoch in range(3):
        by_rank = [board.Scalars(tag)[epoch].value for tag in per_rank]
        assert all(0 < v < epoch_seconds[epoch] for v in by_rank)  # a step is part of an epoch
        assert by_rank[0] != by_rank[1]  # each rank's own clock, not one value copied
        assert board.Scalars("perf/step_seconds/max")[epoch].value == pytest.approx(max(by_rank), rel=1e-6)
        assert board.Scalars("perf/step_seconds/mean")[epoch].value == pytest.approx(sum(by_rank) / 2, rel=1e-6)


def test_tensorboard_command_defaults_to_localhost():
    from moe_dist.cli import build_parser

    args = build_parser().parse_args(["tensorboard", "runs/x"])
    assert (args.run_dir, args.host, args.port) == ("runs/x", "127.0.0.1", 6006)


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, dict]:
    """Two epochs of the synthetic MoE in this process: scalars and selection-table images."""
    from conftest import tiny_synthetic
    from moe_dist.config import load_config
    from moe_dist.train.build import build_trainer

    run = tmp_path_factory.mktemp("board") / "run"
    threads = torch.get_num_threads()
    try:
        return run, build_trainer(load_config(None, tiny_synthetic(run, "train.epochs=2"))).fit()
    finally:
        torch.set_num_threads(threads)


def test_tensorboard_serves_the_runs_scalars_and_images(small_run):
    run, result = small_run
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moe_dist.cli", "tensorboard", str(run), "--port", str(port)],
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        tags: dict = {}
        while time.monotonic() < deadline and "train/loss" not in tags.get(".", {}):
            assert proc.poll() is None, proc.communicate()[0]
            try:
                tags = json.loads(_get(f"{base}/data/plugin/scalars/tags"))
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert "train/loss" in tags.get("."), tags
        assert {"perf/step_seconds/rank0", "eval/error", "moe/usage_entropy"} <= set(tags["."])
        loss = json.loads(_get(f"{base}/data/plugin/scalars/scalars?run=.&tag=train/loss"))
        assert [step for _, step, _ in loss] == [1, 2]  # epochs from 1, as everywhere
        assert [value for *_, value in loss] == pytest.approx([h["train_loss"] for h in result["history"]],
                                                             rel=1e-6)
        images = json.loads(_get(f"{base}/data/plugin/images/tags"))["."]
        assert "moe/selection_table" in images
        samples = json.loads(_get(f"{base}/data/plugin/images/images?run=.&tag=moe/selection_table"))
        assert [s["step"] for s in samples] == [1, 2]
        png = _get(f"{base}/data/plugin/images/individualImage?{samples[-1]['query']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    finally:
        os.killpg(proc.pid, 9)
        out = proc.communicate()[0]
    assert re.search(rf"at http://127\.0\.0\.1:{port}/", out), out  # bound to localhost


def test_tensorboard_on_a_taken_port_is_one_line(small_run):
    run, _ = small_run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([sys.executable, "-m", "moe_dist.cli", "tensorboard", str(run),
                               "--port", str(taken.getsockname()[1])],
                              env=script_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moe-dist: error:")]
    assert errors and errors[0].startswith("moe-dist: error: TensorBoard did not start:"), proc.stderr
    assert "in use" in errors[0]
