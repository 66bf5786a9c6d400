"""The native CPU kernels of the pooled convolution blocks (moe_dist/models/native.py).

They are held to the PyTorch fused blocks they replace (moe_dist/models/layers.py, which the
float64 tests of test_models.py hold to nn's modules; its float32 precision test runs both
blocks against a float64 nn run): values, every gradient, the winning phase on ties, NaN,
odd sizes, thread counts, global BatchNorm on 2 ranks; a whole training run against the
PyTorch path; and the conditions under which they run or step aside.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from moe_dist.models import FmnistGate, native
from moe_dist.models.layers import (StackedConvReluPool, _ConvBatchNormReluPool, _ConvReluPool,
                                    conv_batchnorm_relu_pool, pool_phase_columns)
from moe_dist.parallel.batchnorm import LocalBatchStats

LOCAL = LocalBatchStats()
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) on this machine")


@pytest.fixture(autouse=True)
def native_on(monkeypatch):
    """The kernels on, whatever the caller's environment says."""
    monkeypatch.setenv("MOE_DIST_NATIVE", "1")


@needs_compiler
def test_the_kernels_build_where_a_compiler_is():
    """A broken source must fail the suite, not skip the tests that use it."""
    assert native.library() is not None


def _images(n: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    """Digit-like float32 images: a flat background (tied pooling windows), noise in the middle
    and a flat bright square."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    x[:, :, 6:size - 6, 5:size - 7] = torch.rand(n, 1, size - 12, size - 12, generator=g)
    x[: n // 2, :, 2:6, 2:6] = 1.0
    return x


def _gate_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 9, generator=g) * 0.4
    bias = torch.randn(8, generator=g)
    gamma = torch.tensor([1.5, -0.7, 0.0, 1.0, 0.3, -2.0, 0.9, 1.2])
    beta = torch.randn(8, generator=g) * 0.5
    return [weight, bias, gamma, beta]


def _run_block(block, cols, params, extra=(), grad_seed: int = 1):
    """Outputs of ``block.apply(cols, *params, *extra)`` and the gradients of a random linear
    function of its first output with respect to params."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    outs = block.apply(cols, *leaves, *extra)
    outs = outs if isinstance(outs, tuple) else (outs,)
    w = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(grad_seed))
    (outs[0] * w).sum().backward()
    return [o.detach() for o in outs], [p.grad for p in leaves]


def _close(a, b, rtol):
    assert a.shape == b.shape
    err = float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))
    assert err <= rtol, err


@needs_compiler
@pytest.mark.parametrize("batch", [512, 37])  # 37: windows that are not a whole vector or block
def test_native_gate_block_equals_the_pytorch_block(batch):
    cols = pool_phase_columns(_images(batch), 3)
    params = _gate_params()
    assert native.runs(cols, *params)
    (out, mean, var, _), grads = _run_block(native.GateBlock, cols, params, (1e-5, LOCAL))
    (out_t, mean_t, var_t, *_), grads_t = _run_block(_ConvBatchNormReluPool, cols, params, (1e-5,))
    _close(out, out_t, 3e-7)
    _close(mean, mean_t, 1e-6)
    _close(var, var_t, 1e-6)
    for name, g, g_t in zip(["weight", "bias", "gamma", "beta"], grads, grads_t):
        if name == "bias":  # BatchNorm removes the conv bias: exactly no gradient
            assert torch.equal(g, torch.zeros(8)) and torch.equal(g_t, torch.zeros(8))
        else:
            _close(g, g_t, 1e-5)


@needs_compiler
def test_native_gate_block_is_the_one_a_float32_gate_runs(monkeypatch):
    """FmnistGate in training on float32 CPU images takes the native block; with
    MOE_DIST_NATIVE=0 the PyTorch block, with the same outputs and gradients."""
    calls = []
    monkeypatch.setattr(native.GateBlock, "apply", _counting(native.GateBlock.apply, calls))
    torch.manual_seed(0)
    gate = FmnistGate(5)
    x = _images(64)
    first = _forward_backward(gate, x)
    assert len(calls) == 1
    monkeypatch.setenv("MOE_DIST_NATIVE", "0")
    again = _forward_backward(gate, x)
    assert len(calls) == 1
    for a, b in zip(first, again):
        _close(a, b, 1e-5)


def _counting(fn, calls):
    def wrapped(*args):
        calls.append(1)
        return fn(*args)
    return wrapped


def _forward_backward(gate, x):
    gate.zero_grad()
    out = gate(x)
    out.square().sum().backward()
    return [out.detach(), *(p.grad.clone() for p in gate.parameters())]


@needs_compiler
@pytest.mark.parametrize("num_experts", [5, 160])
def test_native_experts_block_equals_the_pytorch_block(num_experts):
    g = torch.Generator().manual_seed(num_experts)
    cols = pool_phase_columns(_images(96), 3)
    weight, bias = torch.randn(num_experts, 1, 9, generator=g) * 0.4, torch.randn(num_experts, 1, generator=g) * 0.1
    bias[0] = 0.0  # background windows exactly at 0: no gradient through the ReLU
    (out,), grads = _run_block(native.ExpertsBlock, cols, [weight, bias])
    (out_t,), grads_t = _run_block(_ConvReluPool, cols, [weight, bias])
    _close(out, out_t, 2e-7)
    for g_n, g_t in zip(grads, grads_t):
        _close(g_n, g_t, 1e-5)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
def test_native_experts_layer_equals_the_pytorch_layer_on_other_shapes(monkeypatch, threads):
    """StackedConvReluPool with several input channels, a 5x5 kernel (K = 50), two output
    channels and 26x26 images: 37 samples give 4,477 windows (blocks and a tail that is not a
    whole vector), 2 samples fewer windows than threads have blocks. The layer takes the
    native block, and its output and gradients are the PyTorch layer's."""
    calls = []
    monkeypatch.setattr(native.ExpertsBlock, "apply", _counting(native.ExpertsBlock.apply, calls))
    layer = _random_layer(StackedConvReluPool(3, 2, 2, 5), seed=0, std=0.2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for n in (37, 2):
            x = torch.rand(n, 2, 26, 26)
            x[:, :, :8] = 0.0  # flat rows: tied windows
            _assert_both_paths_agree(monkeypatch, layer, x, shared=True)
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 2


@needs_compiler
def test_native_experts_layer_equals_the_pytorch_layer_on_each_experts_own_inputs(monkeypatch):
    """Top-k routing gives each expert its own samples (``shared=False``: x is [E, N, ...],
    columns [E, K, 4, M]): the native block reads expert e's columns for e's rows, with the
    PyTorch layer's outputs and gradients; a mix-up of experts would show, their inputs and
    weights differing."""
    calls = []
    monkeypatch.setattr(native.ExpertsBlock, "apply", _counting(native.ExpertsBlock.apply, calls))
    layer = _random_layer(StackedConvReluPool(4, 1, 2, 3), seed=1, std=0.3)
    x = torch.stack([_images(21, seed=e) * (1 + e) for e in range(4)])
    _assert_both_paths_agree(monkeypatch, layer, x, shared=False)
    assert len(calls) == 1


def _random_layer(layer, seed: int, std: float):
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.weight.normal_(std=std)
        layer.bias.normal_(std=0.1)
    return layer


def _assert_both_paths_agree(monkeypatch, layer, x, shared: bool):
    """The layer's output and gradients with the native kernels and with MOE_DIST_NATIVE=0."""
    ours = _layer_forward_backward(layer, x, shared)
    monkeypatch.setenv("MOE_DIST_NATIVE", "0")
    ref = _layer_forward_backward(layer, x, shared)
    monkeypatch.setenv("MOE_DIST_NATIVE", "1")
    for a, b in zip(ours, ref):
        _close(a, b, 2e-6)


def _layer_forward_backward(layer, x, shared=True):
    layer.zero_grad()
    out = layer(x, shared=shared)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()]


@needs_compiler
def test_native_blocks_leave_mismatched_shapes_to_the_pytorch_path():
    """A layer whose input channels or BatchNorm width do not fit gets PyTorch's error, never
    a native read out of bounds."""
    cols = pool_phase_columns(_images(4), 3)
    assert not native.runs(cols, torch.randn(8, 27))  # weight for 3 input channels
    assert not native.runs(cols, torch.randn(8, 9), torch.randn(8), torch.randn(4), torch.randn(8))
    assert not native.runs(cols, torch.randn(2, 1, 9), torch.randn(2, 2))
    assert not native.runs(cols[:, :, :0], torch.randn(8, 9))  # no windows
    with pytest.raises(RuntimeError):
        StackedConvReluPool(2, 3, 1, 3)(_images(4), shared=True)
    gate = FmnistGate(5)
    gate.bn = torch.nn.BatchNorm2d(4)
    with pytest.raises(RuntimeError):
        conv_batchnorm_relu_pool(_images(4), gate.conv, gate.bn)


@needs_compiler
def test_native_blocks_refuse_a_second_derivative_and_ignore_the_default_dtype():
    cols = pool_phase_columns(_images(6), 3)
    params = [p.requires_grad_() for p in _gate_params()]
    out = native.GateBlock.apply(cols, *params, 1e-5, LOCAL)[0]
    (grad_w,) = torch.autograd.grad(out.square().sum(), params[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_w.sum().backward()
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        weight, bias = torch.randn(2, 1, 9, dtype=torch.float32), torch.zeros(2, 1, dtype=torch.float32)
        out = native.ExpertsBlock.apply(cols, weight, bias)
        out_t = _ConvReluPool.apply(cols, weight, bias)
        assert out.dtype == torch.float32
        _close(out, out_t, 2e-7)
        (out_g, *_), _ = _run_block(native.GateBlock, cols, _gate_params(), (1e-5, LOCAL))
        assert out_g.dtype == torch.float32
    finally:
        torch.set_default_dtype(before)


@needs_compiler
def test_native_blocks_pick_max_pool2ds_phase_on_ties():
    """Flat background and a flat bright square tie the four phases of many windows: the
    winning phase saved for backward is the first, as in the PyTorch blocks (max_pool2d's
    choice), and theirs; for the gate also at a zero and a negative BatchNorm scale. (With
    columns that need no gradient, a tie between equal columns cannot change a gradient,
    hence the direct look at the saved phase.)"""
    cols = pool_phase_columns(_images(16), 3)
    weight, bias = torch.randn(4, 1, 9).requires_grad_(), torch.tensor([[0.5], [0.0], [-0.2], [0.1]])
    phase = native.ExpertsBlock.apply(cols, weight, bias).grad_fn.saved_tensors[1]
    phase_t = _ConvReluPool.apply(cols, weight, bias).grad_fn.saved_tensors[2]
    assert _mismatch(phase, phase_t) < 1e-3 and (phase == 0).float().mean() > 0.3
    params = [p.requires_grad_() for p in _gate_params()]
    phase = native.GateBlock.apply(cols, *params, 1e-5, LOCAL)[0].grad_fn.saved_tensors[5]
    phase_t = _ConvBatchNormReluPool.apply(cols, *params, 1e-5)[0].grad_fn.saved_tensors[5]
    assert _mismatch(phase, phase_t) < 1e-3


def _mismatch(a, b):
    """Share of windows whose phases differ: 0 but where two phases' products differ only by
    rounding (the kernels add the 9 terms in another order than PyTorch's product)."""
    return float((a != b).float().mean())


@needs_compiler
def test_native_blocks_pass_nan_through_as_the_pytorch_blocks_do():
    """A diverged run (a NaN weight) gets NaN outputs where the PyTorch blocks give them and
    the same gradients, NaN or not, with the winning phase in range: no exception."""
    cols = pool_phase_columns(_images(8), 3)
    params = _gate_params()
    params[0][3, 4] = float("nan")
    (out, *_), grads = _run_block(native.GateBlock, cols, params, (1e-5, LOCAL))
    (out_t, *_), grads_t = _run_block(_ConvBatchNormReluPool, cols, params, (1e-5,))
    assert out[3].isnan().all() and not out[0].isnan().any()
    torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-6, equal_nan=True)
    for g, g_t in zip(grads, grads_t):
        torch.testing.assert_close(g, g_t, rtol=1e-4, atol=1e-5, equal_nan=True)
    weight = torch.randn(3, 1, 9)
    weight[1, 0, 0] = float("nan")
    (out,), grads = _run_block(native.ExpertsBlock, cols, [weight, torch.zeros(3, 1)])
    (out_t,), grads_t = _run_block(_ConvReluPool, cols, [weight, torch.zeros(3, 1)])
    assert out[1].isnan().all() and not out[0].isnan().any()
    torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-6, equal_nan=True)
    for g, g_t in zip(grads, grads_t):
        torch.testing.assert_close(g, g_t, rtol=1e-4, atol=1e-5, equal_nan=True)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
def test_native_blocks_give_the_same_result_on_any_thread_count(threads):
    cols = pool_phase_columns(_images(300), 3)
    params = _gate_params(seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        result = _run_block(native.GateBlock, cols, params, (1e-5, LOCAL))
    finally:
        torch.set_num_threads(before)
    reference = _run_block(native.GateBlock, cols, params, (1e-5, LOCAL))
    for a, b in zip([*result[0], *result[1]], [*reference[0], *reference[1]]):
        _close(a, b, 1e-6)


@needs_compiler
def test_native_blocks_step_aside_where_they_do_not_apply(monkeypatch):
    cols = pool_phase_columns(_images(4), 3)
    weight = torch.randn(2, 9)
    assert native.runs(cols, weight)
    assert not native.runs(cols.double(), weight.double())
    assert not native.runs(cols.clone().requires_grad_(), weight)
    assert not native.runs(cols[None], weight)  # per-expert columns need a weight per expert
    assert native.runs(torch.stack([cols, cols]), torch.randn(2, 1, 9), torch.randn(2, 1))
    assert not native.runs(torch.stack([cols, cols]), torch.randn(3, 1, 9), torch.randn(3, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.runs(cols, weight)
    seen = []
    torch.func.vmap(lambda w: seen.append(native.runs(cols, w)) or w.sum())(torch.randn(3, 2, 9))
    assert seen == [False]
    monkeypatch.setenv("MOE_DIST_NATIVE", "0")
    assert not native.runs(cols, weight)
    monkeypatch.setenv("MOE_DIST_NATIVE", "off")
    with pytest.raises(ValueError, match="MOE_DIST_NATIVE='off': allowed values are 1"):
        native.runs(cols, weight)


def test_each_source_builds_in_its_own_folder(tmp_path, monkeypatch):
    """Two versions of the kernels on one machine (two checkouts, an upgrade under a running
    job) must not share a build folder: torch's builder would rebuild one over the other."""
    key = native._build_key()
    assert key == native._build_key()
    for i, source in enumerate(native.SOURCES):  # a change to either source
        other = tmp_path / source.name
        other.write_bytes(source.read_bytes() + b"\n// another version\n")
        monkeypatch.setattr(native, "SOURCES", native.SOURCES[:i] + (other,) + native.SOURCES[i + 1:])
        assert native._build_key() != key
        monkeypatch.undo()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A process killed while building leaves torch's lock file, which would make every later
    build wait forever; one older than STALE_LOCK_S goes, a recent one (a build under way) stays."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    native._remove_stale_lock(lock)
    assert lock.exists()
    old = time.time() - native.STALE_LOCK_S - 10
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        native._remove_stale_lock(lock)
    assert not lock.exists()
    native._remove_stale_lock(lock)  # none there: nothing to do


@needs_compiler
def test_a_compiler_without_openmp_or_native_target_builds_the_kernels_for_one_thread(tmp_path, monkeypatch):
    """Apple's clang has no -fopenmp (and older ones no -march=native): the next flag set builds
    the same kernels serially, after a warning that names the failure, instead of losing them."""
    from moe_dist.parallel.segments import Segments, segment_sum

    monkeypatch.setenv("MOE_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAG_SETS", (("-O3", "-fopenmp", "-fno-such-option-for-moe-dist"), ("-O3",)))
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match=r"built with -O3 only \(-O3 -fopenmp -fno-such-option-for-moe-dist: .*"
                                            r"no-such-option"):
        assert native.library() is not None
    assert list((tmp_path / "native").glob(f"moe_dist_native_{native._build_key(('-O3',))}/*.so"))
    cols = pool_phase_columns(_images(37), 3)
    params = _gate_params()
    (out, mean, var, _), grads = _run_block(native.GateBlock, cols, params, (1e-5, LOCAL))
    (out_t, mean_t, var_t, *_), grads_t = _run_block(_ConvBatchNormReluPool, cols, params, (1e-5,))
    _close(out, out_t, 3e-7)
    _close(var, var_t, 1e-6)
    for g, g_t in zip(grads, grads_t):
        _close(g, g_t, 1e-5)
    src, group = torch.randn(50, 7), torch.randint(0, 9, (50,))
    assert torch.equal(segment_sum(src, Segments(group, 9)), torch.zeros(9, 7).index_add(0, group, src))


def test_a_failed_build_warns_once_and_leaves_the_pytorch_path(monkeypatch):
    def broken():
        raise RuntimeError("no compiler")
    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(native, "_state", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.library() is None and native.library() is None
    assert len(caught) == 1 and "no compiler" in str(caught[0].message)
    layer = StackedConvReluPool(2, 1, 1, 3)
    assert layer(_images(2), shared=True).shape == (2, 2, 169)


@needs_compiler
def test_training_with_the_native_blocks_follows_the_pytorch_path(tmp_path, monkeypatch, data_root):
    """Two epochs of the Fashion-MNIST vanilla architecture on a fixture subset: the losses of
    every step with the native blocks and with MOE_DIST_NATIVE=0 agree within 1e-4 relative."""
    from moe_dist.config import load_config
    from moe_dist.train.build import build_trainer

    def history(native_on: bool, name: str):
        monkeypatch.setenv("MOE_DIST_NATIVE", "1" if native_on else "0")
        cfg = load_config("configs/fmnist/vanilla.yaml", [
            "data.name=mnist10k", f"data.root={data_root}", "data.train_size=512", "data.test_size=64",
            "train.epochs=2", "train.batch_size=128", "train.progress=false", f"run_dir={tmp_path / name}"])
        trainer = build_trainer(cfg)
        losses = []
        for epoch in range(2):
            for x, y, *_ in trainer.data.train_batches.batches(epoch):
                losses.append(float(trainer.train_step(x, y).loss.detach()))
        return torch.tensor(losses)

    native_losses, torch_losses = history(True, "native"), history(False, "torch")
    assert len(native_losses) == 8
    torch.testing.assert_close(native_losses, torch_losses, rtol=1e-4, atol=0)


def _two_rank_gate_worker(rank: int, world: int, out_dir: str, first: int, native_off_on: int) -> None:
    """The FashionMNIST gate on this rank's share (``first`` samples on rank 0, the rest of
    9 on rank 1) of a batch, BatchNorm on the global batch's statistics, the native kernels
    off on rank ``native_off_on`` (-1: none); what it computed and which block ran."""
    import os

    from moe_dist.parallel import ParallelContext, parallelize

    if rank == native_off_on:
        os.environ["MOE_DIST_NATIVE"] = "0"
    seen = []
    apply = native.GateBlock.apply
    native.GateBlock.apply = lambda *args: seen.append(args[-1].distributed) or apply(*args)
    model = parallelize(_gate_model(), ParallelContext.create(ep_size=1))
    rows = slice(0, first) if rank == 0 else slice(first, 9)
    out = model.gate(_images(9, seed=5)[rows])
    (out * _output_weights()[rows]).sum().backward()
    grads = {n: p.grad for n, p in model.gate.named_parameters()}
    torch.save({"out": out.detach(), "grads": grads, "seen": seen, "buffers": dict(model.gate.named_buffers())},
               f"{out_dir}/rank{rank}.pt")


def _output_weights():
    return torch.linspace(-1, 1, 9 * 4).view(9, 4)


def _gate_model():
    from moe_dist.config import LossConfig, ModelConfig, MoEConfig
    from moe_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="fmnist"), MoEConfig(num_experts=4), LossConfig(), 10, (1, 28, 28))
    with torch.no_grad():
        model.gate.bn.weight.copy_(_gate_params()[2])
    return model


@needs_compiler
@pytest.mark.multiprocess
@pytest.mark.parametrize("first,native_off_on,native_ran", [(5, -1, True), (9, -1, True), (5, 1, False)],
                         ids=["5+4", "9+0", "one-rank-without-kernels"])
def test_native_gate_block_on_two_ranks_uses_the_global_batch(tmp_path, first, native_off_on, native_ran):
    """Under 2 gloo processes the gate's BatchNorm takes the native block with the global
    batch's statistics on both ranks, a rank without samples included (9 + 0), and gives what
    one process gives on the whole batch: outputs, the gradients summed over the ranks, the
    running statistics on every rank. Where one rank's kernels are off, both ranks agree on
    the nn modules instead (no rank waits in a collective the other never calls)."""
    from procs import spawn

    spawn(_two_rank_gate_worker, 2, str(tmp_path), first, native_off_on)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["seen"] for r in ranks] == [[True], [True]] if native_ran else [[], []]
    model = _gate_model()
    out = model.gate(_images(9, seed=5))
    (out * _output_weights()).sum().backward()
    _close(torch.cat([r["out"] for r in ranks]), out.detach(), 1e-6)
    for name, p in model.gate.named_parameters():
        summed = ranks[0]["grads"][name] + ranks[1]["grads"][name]
        if torch.equal(p.grad, torch.zeros_like(p.grad)):  # the conv bias: the nn path's shares cancel to rounding
            assert summed.abs().max() < 1e-4, name
        else:
            _close(summed, p.grad, 1e-5)
    for name, b in model.gate.named_buffers():
        for r in ranks:
            _close(r["buffers"][name], b, 1e-6)


@needs_compiler
def test_native_gate_block_with_no_sample_anywhere_gives_zero_gradients():
    """A global batch with no sample on any rank (count 0): zero gradients, no NaN, and the
    running statistics untouched (as the nn path)."""
    class Global(LocalBatchStats):  # one process standing in for ranks that all have no rows
        distributed = True

    cols = pool_phase_columns(_images(0), 3)
    params = [p.requires_grad_() for p in _gate_params()]
    out, mean, var, count = native.GateBlock.apply(cols, *params, 1e-5, Global())
    assert out.shape == (8, 0) and float(count) == 0
    out.sum().backward()
    for p in params:
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    assert Global().all_agree("anything", True) and not Global().all_agree("anything", False)
