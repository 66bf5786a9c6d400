"""The scale-out cost model (benchmarks/scaleout_model.py) against the committed measurements
of benchmarks/bench_scaleout.py (docs/results/scaleout/): its byte formulas equal what
moe_dist.parallel.traffic counted on every two-process row (native kernels and PyTorch
blocks), and its fits and GPU predictions regenerate model.json from cpu.json and
cpu_pytorch.json alone.

bench_scaleout.py itself is not run here: even --quick starts six process groups (about a
minute on two busy cores)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results" / "scaleout"
sys.path.insert(0, str(REPO / "benchmarks"))

import scaleout_model  # noqa: E402

from moe_dist.parallel.groups import expert_blocks  # noqa: E402

LAYOUT_BYTES = 8  # the batch layout's all-gather (one int64 to the other rank): not in the formula


@pytest.fixture(scope="module")
def rows():
    return json.loads((RESULTS / "cpu.json").read_text())["rows"]


@pytest.fixture(scope="module")
def pytorch_rows():
    """The same benchmark with MOE_DIST_NATIVE=0 (the PyTorch blocks, as on CUDA)."""
    return json.loads((RESULTS / "cpu_pytorch.json").read_text())["rows"]


def test_byte_formulas_equal_the_counted_bytes(rows, pytorch_rows):
    """Both paths of the gate's global BatchNorm: the native one (cpu.json) and PyTorch's."""
    assert all(r["native"] for r in rows) and not any(r["native"] for r in pytorch_rows)
    two = [r for r in rows + pytorch_rows if r["ep_size"] == 2]
    assert len(two) == 16
    for r in two:
        E, B = r["experts"], r["batch"]
        sizes = scaleout_model.model_sizes(E)
        for rank, counted in enumerate(r["bytes_per_step"]):
            formula = scaleout_model.bytes_per_rank(E, 2, 2, B // 2, sizes, L=len(expert_blocks(E, 2)[rank]),
                                                    native=r.get("native", False))
            assert counted["dispatch"] == formula["dispatch"], (E, B, rank)
            assert counted["gradients"] == formula["gradients"], (E, B, rank)
            assert counted["other"] == formula["other"] + LAYOUT_BYTES, (E, B, rank)


def test_model_json_regenerates_from_the_measurements(rows, pytorch_rows):
    _, numbers = scaleout_model.report(rows, pytorch_rows)
    committed = json.loads((RESULTS / "model.json").read_text())
    assert numbers["compute_fit_s"] == pytest.approx(committed["compute_fit_s"], rel=1e-9)
    assert numbers["memory_fit_mb"] == pytest.approx(committed["memory_fit_mb"], rel=1e-9)
    assert numbers["gpu_memory_fit_mb"] == pytest.approx(committed["gpu_memory_fit_mb"], rel=1e-9)
    for ours, theirs in zip(numbers["gpu"], committed["gpu"], strict=True):
        for key in ("step_ms", "comm_ms", "memory_mb"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-9), (ours["gpus"], ours["experts"], key)
