"""Models: the papers' architectures, the expert bank against separate modules, the routings.

Shape legend: B batch; E experts; N rows per expert batch; C classes; K experts per sample.
Equivalence checks run in float64 so that the tolerances only absorb summation order.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import LossConfig, ModelConfig, MoEConfig
from moe_dist.errors import ConfigError
from moe_dist.models import (CifarExpertBank, CifarGate, ExpertAttention, FmnistGate, MnistExpert,
                             MnistExpertBank, MnistGate, MoE, PatchExpertBank, PatchRouter,
                             SingleModel, build_model)
from moe_dist.models.layers import StackedConvReluPool

TOL = dict(rtol=1e-9, atol=1e-11)

# arch -> (bank class, single-expert kwargs, per-sample input shape)
ARCHS = {
    "mnist": (MnistExpertBank, {"num_classes": 10, "hidden_size": 5}, (1, 28, 28)),
    "fmnist": (MnistExpertBank, {"num_classes": 10, "hidden_size": 64}, (1, 28, 28)),
    "fmnist_mnist": (MnistExpertBank, {"num_classes": 12, "hidden_size": 5}, (1, 28, 28)),
    "cifar100": (CifarExpertBank, {"num_classes": 100}, (3, 32, 32)),
    "patch_cubic": (PatchExpertBank, {"width": 8, "activation": "cubic", "patch_size": 50}, (200,)),
    "patch_linear": (PatchExpertBank, {"width": 8, "activation": "linear", "patch_size": 50}, (200,)),
}


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_experts(arch: str, num_experts: int, seed: int = 0):
    bank_class, kwargs, shape = ARCHS[arch]
    torch.manual_seed(seed)
    modules = [bank_class.new_expert(**kwargs).double() for _ in range(num_experts)]
    return bank_class, modules, shape


def assert_grads_match(bank, modules):
    """Every bank parameter's gradient slice e equals expert module e's gradient."""
    for name, p in bank.named_parameters():
        for e, module in enumerate(modules):
            ref = dict(module.named_parameters())[name].grad
            ref = torch.zeros_like(p[e]) if ref is None else ref
            torch.testing.assert_close(p.grad[e], ref, **TOL, msg=f"{name}[{e}]")


# ----------------------------------------------------------------------------- architectures


def test_parameter_counts_match_the_spec():
    assert numel(MnistExpert()) == 1382  # A.1.1
    assert numel(MnistGate(5)) == 26063
    assert numel(MnistExpert(num_classes=12)) == 1448  # A.1.2
    assert numel(MnistGate(6, kernel_size=5)) == 22912
    mnist = build_model(ModelConfig(arch="mnist"), MoEConfig(num_experts=5), LossConfig(), 10, (1, 28, 28))
    assert numel(mnist) == 32973  # the notebook's printed total
    combined = build_model(ModelConfig(arch="fmnist_mnist"), MoEConfig(num_experts=6), LossConfig(),
                           12, (1, 28, 28))
    assert numel(combined) == 31600
    assert sum(p.numel() for p in combined.gate_parameters()) == 22912


def test_bank_state_dict_is_the_expert_state_dict_stacked():
    bank_class, modules, _ = make_experts("cifar100", 3)
    bank = bank_class.from_modules(modules)
    state = bank.state_dict()
    assert list(state) == list(modules[0].state_dict())
    for key, value in modules[1].state_dict().items():
        assert state[key].shape == (3, *value.shape)
        torch.testing.assert_close(state[key][1], value, rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_create_and_to_modules_round_trip(arch):
    bank_class, kwargs, _ = ARCHS[arch]
    torch.manual_seed(3)
    fresh = [bank_class.new_expert(**kwargs) for _ in range(2)]
    torch.manual_seed(3)
    bank = bank_class.create(2, **kwargs)
    rng = torch.get_rng_state()
    back = bank.to_modules()
    assert torch.equal(rng, torch.get_rng_state())  # to_modules draws no random numbers
    for a, b in zip(fresh, back):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka


def test_init_scale_multiplies_weights_and_biases():
    torch.manual_seed(0)
    ref = PatchExpertBank.create(2, width=8, activation="cubic", patch_size=50)
    torch.manual_seed(0)
    small = PatchExpertBank.create(2, init_scale=0.001, width=8, activation="cubic", patch_size=50)
    for p_ref, p_small in zip(ref.parameters(), small.parameters()):
        torch.testing.assert_close(p_small, 0.001 * p_ref)


# ----------------------------------------------------------------------------- bank == modules


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_expert"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_bank_equals_separate_modules(arch, shared):
    """Outputs, hidden states and every gradient; CIFAR's BatchNorm in training mode."""
    E, N = 3, 5
    bank_class, modules, shape = make_experts(arch, E)
    bank = bank_class.from_modules(modules)
    torch.manual_seed(1)
    x = torch.randn(*((N,) if shared else (E, N)), *shape, dtype=torch.float64)
    out_ENC, hidden_ENH = bank(x, shared=shared)
    refs = [m(x if shared else x[e]) for e, m in enumerate(modules)]
    torch.testing.assert_close(out_ENC, torch.stack([r[0] for r in refs]), **TOL)
    torch.testing.assert_close(hidden_ENH, torch.stack([r[1] for r in refs]), **TOL)
    w_out, w_hid = torch.randn_like(out_ENC), torch.randn_like(hidden_ENH)
    ((out_ENC * w_out).sum() + (hidden_ENH * w_hid).sum()).backward()
    sum((r[0] * w_out[e]).sum() + (r[1] * w_hid[e]).sum() for e, r in enumerate(refs)).backward()
    assert_grads_match(bank, modules)
    for name, buf in bank.named_buffers():  # BatchNorm running statistics
        ref = torch.stack([dict(m.named_buffers())[name] for m in modules])
        torch.testing.assert_close(buf, ref, **TOL)


@pytest.mark.parametrize("arch", ["cifar100", "mnist", "patch_cubic"])
def test_masked_padding_rows_are_ignored(arch):
    """Per-expert padded batches: BN statistics and running stats over the real rows only;
    an expert with no real row keeps its running stats and gets no gradient."""
    E, N = 3, 4
    real_E = [4, 2, 0]
    bank_class, modules, shape = make_experts(arch, E)
    bank = bank_class.from_modules(modules)
    torch.manual_seed(2)
    x = torch.randn(E, N, *shape, dtype=torch.float64)
    mask_EN = torch.arange(N)[None, :] < torch.tensor(real_E)[:, None]
    out_ENC, hidden_ENH = bank(x, shared=False, mask_EN=mask_EN)
    w_out = torch.randn_like(out_ENC) * mask_EN[:, :, None]
    (out_ENC * w_out).sum().backward()
    ref_loss = 0.0
    for e, (m, n) in enumerate(zip(modules, real_E)):
        if n:
            out_NC, hid_NH = m(x[e, :n])
            torch.testing.assert_close(out_ENC[e, :n], out_NC, **TOL)
            torch.testing.assert_close(hidden_ENH[e, :n], hid_NH, **TOL)
            ref_loss = ref_loss + (out_NC * w_out[e, :n]).sum()
    ref_loss.backward()
    assert torch.isfinite(out_ENC).all()
    assert_grads_match(bank, modules)
    for name, buf in bank.named_buffers():
        torch.testing.assert_close(buf, torch.stack([dict(m.named_buffers())[name] for m in modules]), **TOL)


def test_cifar_bank_eval_mode_uses_running_stats():
    bank_class, modules, shape = make_experts("cifar100", 2)
    bank = bank_class.from_modules(modules)
    x = torch.randn(6, *shape, dtype=torch.float64)
    bank(x, shared=True)  # one training step of the running statistics
    for m in modules:
        m(x)
    bank.eval()
    out_ENC, _ = bank(x[:3], shared=True)
    torch.testing.assert_close(out_ENC, torch.stack([m.eval()(x[:3])[0] for m in modules]), **TOL)


def test_fused_conv_relu_pool_breaks_ties_like_max_pool():
    """MNIST images have flat backgrounds, so pooling windows tie: the gradient must go to the
    element max_pool2d picks (checked on the input gradient), and a window whose maximum is
    exactly 0 passes none (ReLU'(0) = 0; checked on the bias gradient)."""
    bank_class, modules, shape = make_experts("mnist", 4)
    with torch.no_grad():
        modules[1].conv1.bias.fill_(0.5)  # ties above zero on the background
        modules[2].conv1.bias.zero_()  # background outputs exactly 0
    bank = bank_class.from_modules(modules)
    x = torch.zeros(6, *shape, dtype=torch.float64)
    x[:, :, 8:20, 10:18] = torch.rand(6, 1, 12, 8, dtype=torch.float64)
    x[:, :, 2:6, 2:6] = 1.0  # a flat bright square
    x_bank, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ENC, _ = bank(x_bank, shared=True)
    w = torch.randn_like(out_ENC)
    (out_ENC * w).sum().backward()
    sum((m(x_ref)[0] * w[e]).sum() for e, m in enumerate(modules)).backward()
    assert_grads_match(bank, modules)
    torch.testing.assert_close(x_bank.grad, x_ref.grad, **TOL)


@pytest.mark.parametrize("shared", [True, False])
def test_fused_conv_relu_pool_gradcheck(shared):
    torch.manual_seed(0)
    layer = StackedConvReluPool(2, 2, 2, 3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    shape = (3, 2, 7, 8) if shared else (2, 3, 2, 7, 8)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _apply(layer, x, w, b, shared),
                                    (x, layer.weight, layer.bias))


def _apply(layer, x, weight, bias, shared):
    return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x, shared))


def test_shared_columns_are_rebuilt_for_a_new_or_modified_input():
    """The gate and the experts share the columns of one input (dense routing): the same
    tensor gives the same columns object; a modified or another tensor, or one with a graph,
    gets its own, equal to a fresh build."""
    from moe_dist.models.layers import pool_phase_columns, shared_pool_phase_columns

    x = torch.randn(4, 1, 28, 28)
    cols = shared_pool_phase_columns(x, 3)
    assert shared_pool_phase_columns(x, 3) is cols and cols.shape == (9, 4, 13 * 13 * 4)
    x.mul_(2.0)
    again = shared_pool_phase_columns(x, 3)
    assert again is not cols and torch.equal(again, pool_phase_columns(x, 3))
    assert torch.equal(shared_pool_phase_columns(x.clone(), 3), again)
    assert shared_pool_phase_columns(x, 5).shape == (25, 4, 12 * 12 * 4)
    with_graph = x.clone().requires_grad_()
    assert shared_pool_phase_columns(with_graph, 3).grad_fn is not None


def test_long_rows_matmul_t_is_the_matrix_product():
    from moe_dist.models.layers import long_rows_matmul_t

    torch.manual_seed(0)
    a, b = torch.randn(5, 2 ** 17, dtype=torch.float64), torch.randn(9, 2 ** 17, dtype=torch.float64)
    torch.testing.assert_close(long_rows_matmul_t(a, b), a @ b.t(), **TOL)
    torch.testing.assert_close(long_rows_matmul_t(a[:, 1:], b[:, 1:]), a[:, 1:] @ b[:, 1:].t(), **TOL)


def _plain_gate(gate, x):
    """FmnistGate's computation as nn modules run it (conv, BatchNorm2d, ReLU, max_pool2d)."""
    z_BF = F.max_pool2d(F.relu(gate.bn(gate.conv(x))), 2).flatten(1)
    return gate.out(F.relu(gate.fc2(F.relu(gate.fc1(z_BF)))))


def _gate_and_images(seed: int = 0, momentum: float | None = 0.1, batch: int = 6):
    """A FashionMNIST gate whose BatchNorm has a negative and a zero scale (the max of the
    normalised phases is then the min of the convolution's, or all of them tie) and a bias
    that clips half the windows; images with flat regions, so that pooling windows tie."""
    torch.manual_seed(seed)
    gate = FmnistGate(5).double()
    gate.bn.momentum = momentum
    with torch.no_grad():
        gate.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 1.0, 0.3, -2.0, 0.9, 1.2]))
        gate.bn.bias.normal_()
    x = torch.randn(batch, 1, 28, 28, dtype=torch.float64) + 0.5
    x[:, :, :9] = 0.25  # flat band: equal convolution outputs in a window
    x[: batch // 2, :, 14:22, 4:20] = 1.0  # a flat square (interior: oneDNN rounds the borders apart)
    return gate, x


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_gate_block_equals_nn_modules(momentum):
    """The fused conv + BatchNorm + ReLU + max-pool of FmnistGate (training, local statistics)
    gives nn's outputs, gradients (input and every parameter, ties and negative BatchNorm
    scales included), running statistics and counter, step after step; evaluation runs the
    nn modules, and so do several processes (global statistics) in float64 (the native block
    serves global statistics in float32: tests/test_native.py)."""
    from moe_dist.models.layers import fuses_conv_batchnorm
    from moe_dist.parallel.batchnorm import LocalBatchStats

    gate, x = _gate_and_images(momentum=momentum)
    ref = copy.deepcopy(gate)
    assert fuses_conv_batchnorm(x, gate.conv, gate.bn)
    for _ in range(3):
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, out_ref = gate(x_ours), _plain_gate(ref, x_ref)
        torch.testing.assert_close(out, out_ref, **TOL)
        w = torch.randn_like(out)
        (out * w).sum().backward()
        (out_ref * w).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
        for (name, p), p_ref in zip(gate.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=name)
        gate.zero_grad(), ref.zero_grad()
        x = x.flip(0) * 1.1
    for (name, b), b_ref in zip(gate.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, **TOL, msg=name)
    assert int(gate.bn.num_batches_tracked) == 3

    class Distributed(LocalBatchStats):
        distributed = True
    gate.bn.batch_stats = Distributed()
    assert not fuses_conv_batchnorm(x, gate.conv, gate.bn)
    gate.bn.batch_stats = LocalBatchStats()
    assert not fuses_conv_batchnorm(x, gate.conv, gate.eval().bn)


def test_fused_gate_block_gradcheck():
    from moe_dist.models.layers import _ConvBatchNormReluPool, pool_phase_columns

    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 8, dtype=torch.float64)  # 4 x 6 convolution outputs, no ties
    weight, bias = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    gamma, beta = torch.tensor([1.5, -0.7, 0.4], dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def block(x, w, b, g, beta):
        return _ConvBatchNormReluPool.apply(pool_phase_columns(x, 3), w, b, g, beta, 1e-5)[0]
    assert torch.autograd.gradcheck(block, tuple(t.requires_grad_() for t in (x, weight, bias, gamma, beta)))


@pytest.mark.parametrize("native_kernels", ["1", "0"])  # moe_dist.models.native's block, the PyTorch one
def test_fused_gate_block_keeps_float32_precision_on_real_images(data_root, monkeypatch, native_kernels):
    """In float32, on digits whose flat background repeats one value hundreds of thousands of
    times, shifted so that the convolution's mean is large next to its spread (where a
    one-pass variance loses digits), and with negative and zero BatchNorm scales, the fused
    block's output, gradients and running variance are as close to a float64 run as nn's
    float32 modules are (within 3x; a one-pass variance is 4x further off, a whole-row
    float32 norm or a variance from the columns' moments 600-2000x)."""
    from moe_dist.data.registry import load_dataset
    from moe_dist.models.layers import conv_batchnorm_relu_pool

    monkeypatch.setenv("MOE_DIST_NATIVE", native_kernels)
    x = load_dataset("mnist10k", data_root, train_size=512, test_size=10).train.x[:512] + 2.0
    torch.manual_seed(0)
    gate = FmnistGate(5)
    with torch.no_grad():
        gate.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.0, 1.0, 0.3, -2.0, 0.9, 1.2]))
        gate.bn.bias.normal_()
    w = torch.randn(512, 8 * 13 * 13, dtype=torch.float64)

    def run(block, dtype):
        g = copy.deepcopy(gate).to(dtype)
        out = block(g, x.to(dtype))
        (out * w.to(dtype)).sum().backward()
        return [out.detach(), g.conv.weight.grad, g.bn.weight.grad, g.bn.bias.grad, g.bn.running_var]

    def plain(g, x):
        return F.max_pool2d(F.relu(g.bn(g.conv(x))), 2).flatten(1)

    ref = run(plain, torch.float64)
    for name, ours, nn32, exact in zip(["out", "conv.weight", "bn.weight", "bn.bias", "running_var"],
                                       run(lambda g, x: conv_batchnorm_relu_pool(x, g.conv, g.bn), torch.float32),
                                       run(plain, torch.float32), ref):
        err = float((ours.double() - exact).norm() / exact.norm())
        err_nn = float((nn32.double() - exact).norm() / exact.norm())
        assert err <= max(3 * err_nn, 1e-7), (name, err, err_nn)


def test_sum_of_squares_is_accurate_for_long_repetitive_rows():
    from moe_dist.models.layers import sum_of_squares

    x = torch.full((3, 300_007), 0.1)  # a prime length: the pieces leave a tail
    x[1] = torch.linspace(-2, 2, 300_007)
    x[2, ::7] = -3.0
    assert sum_of_squares(x).dtype == torch.float32
    for cols in (x, x[:, :5], x[:, :256]):  # long, shorter than a piece, whole pieces
        torch.testing.assert_close(sum_of_squares(cols).double(), cols.double().square().sum(1), rtol=4e-7, atol=0)
    torch.testing.assert_close(sum_of_squares(x.double()), x.double().square().sum(1), rtol=1e-14, atol=0)


def test_fused_gate_block_under_vmap_of_the_batchnorm_affine_alone():
    """vmap may batch gamma and beta while the columns and conv weight are shared: the block
    then must not write the batched scale into the shared product."""
    from moe_dist.models.layers import _ConvBatchNormReluPool, pool_phase_columns

    torch.manual_seed(0)
    cols = pool_phase_columns(torch.randn(3, 1, 10, 10, dtype=torch.float64), 3)
    weight, bias = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    gamma_2C = torch.tensor([[1.5, -0.7, 0.0, 1.0], [0.3, 2.0, -1.0, 0.5]], dtype=torch.float64)
    beta_2C = torch.randn(2, 4, dtype=torch.float64)

    def block(gamma, beta):
        return _ConvBatchNormReluPool.apply(cols, weight, bias, gamma, beta, 1e-5)[0]
    out = torch.func.vmap(block)(gamma_2C, beta_2C)
    grads = torch.func.vmap(torch.func.grad(lambda g, b: block(g, b).square().sum()))(gamma_2C, beta_2C)
    for m in range(2):
        torch.testing.assert_close(out[m], block(gamma_2C[m], beta_2C[m]), **TOL)
        torch.testing.assert_close(grads[m], torch.func.grad(lambda g: block(g, beta_2C[m]).square().sum())(gamma_2C[m]), **TOL)


def test_gates_run_under_vmap_in_training():
    """Stacked runs call a gate through torch.func.vmap over functional_call, a leading member
    dim on parameters, buffers and input: forward and backward in training mode give each
    member what the nn modules give it, running statistics included."""
    gate, _ = _gate_and_images()
    torch.manual_seed(1)
    params = {k: torch.stack([v, 1.1 * v]).detach().requires_grad_() for k, v in gate.named_parameters()}
    buffers = {k: torch.stack([v, v]).clone() for k, v in gate.named_buffers()}
    x_2B = torch.randn(2, 6, 1, 28, 28, dtype=torch.float64)
    run = torch.func.vmap(lambda p, b, x: torch.func.functional_call(gate, (p, b), (x,)), in_dims=(0, 0, 0))
    (run(params, buffers, x_2B).square().sum()).backward()
    for m in range(2):
        ref = copy.deepcopy(gate)
        ref.load_state_dict({k: v[m].detach() for k, v in params.items()} | dict(gate.named_buffers()))
        _plain_gate(ref, x_2B[m]).square().sum().backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name].grad[m], p.grad, **TOL, msg=name)
        for name, b in ref.named_buffers():
            torch.testing.assert_close(buffers[name][m], b, **TOL, msg=name)


# ----------------------------------------------------------------------------- routing


def make_moe(arch: str, routing: str, num_experts: int = 4, seed: int = 0, **moe_kwargs) -> MoE:
    model_arch = "patch_cnn" if arch.startswith("patch") else arch
    activation = "linear" if arch == "patch_linear" else "cubic"
    moe_cfg = MoEConfig(num_experts=num_experts, routing=routing, **moe_kwargs)
    _, _, shape = ARCHS[arch]
    classes = {"patch_cnn": 2, "fmnist_mnist": 12, "cifar100": 100}.get(model_arch, 10)
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=model_arch, expert_activation=activation), moe_cfg,
                       LossConfig(), classes, shape).double()


def gate_logits(model: MoE, x):
    return copy.deepcopy(model.gate)(x)


@pytest.mark.parametrize("arch", ["mnist", "cifar100"])
def test_dense_moe_equals_the_mixture_formula(arch):
    model = make_moe(arch, "dense", num_experts=3)
    modules = model.experts.to_modules()
    gate = copy.deepcopy(model.gate)
    x = torch.randn(6, *ARCHS[arch][2], dtype=torch.float64)
    out = model(x)
    p_BE = F.softmax(gate(x), dim=-1)
    y_EBC = torch.stack([m(x)[0] for m in modules])
    ref_BC = torch.einsum("be,ebc->bc", p_BE, y_EBC)
    torch.testing.assert_close(out.output, ref_BC, **TOL)
    torch.testing.assert_close(out.gate_probs, p_BE, **TOL)
    torch.testing.assert_close(out.expert_outputs, y_EBC, **TOL)
    top_B = p_BE.argmax(-1)
    assert out.expert_index.tolist() == top_B[:, None].tolist()
    torch.testing.assert_close(out.top_expert_output, y_EBC[top_B, torch.arange(6)], **TOL)
    assert out.samples_per_expert.tolist() == torch.bincount(top_B, minlength=3).tolist()
    labels = torch.randint(0, y_EBC.shape[-1], (6,))
    F.nll_loss(torch.log(out.output), labels).backward()
    F.nll_loss(torch.log(ref_BC), labels).backward()
    assert_grads_match(model.experts, modules)
    for p, q in zip(model.gate.parameters(), gate.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


@pytest.mark.parametrize("arch", ["mnist", "fmnist"])
def test_attentive_probs_equal_the_attention_formula(arch):
    model = make_moe(arch, "attentive", num_experts=3)
    modules = model.experts.to_modules()
    gate, attention = copy.deepcopy(model.gate), copy.deepcopy(model.attention)
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    out = model(x)
    g_BH = gate(x)
    refs = [m(x) for m in modules]
    h = g_BH.shape[-1]
    scores_BE = torch.stack([(attention.w_q(g_BH) * attention.w_k(r[1])).sum(-1) for r in refs], 1)
    p_BE = F.softmax(scores_BE / math.sqrt(h), dim=-1)
    torch.testing.assert_close(out.gate_probs, p_BE, **TOL)
    ref_BC = sum(p_BE[:, e, None] * r[0] for e, r in enumerate(refs))
    torch.testing.assert_close(out.output, ref_BC, **TOL)
    # gradients reach the experts through the outputs and the hidden states
    out.output.log().sum().backward()
    ref_BC.log().sum().backward()
    assert_grads_match(model.experts, modules)
    for p, q in zip(model.gate_parameters(), [*gate.parameters(), *attention.parameters()]):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


def topk_reference(model: MoE, modules, gate, x, noise_BE=None):
    """Loop over samples and their chosen experts, one expert call per (sample, slot)."""
    logits_BE = gate(x)
    if noise_BE is not None:
        logits_BE = logits_BE + noise_BE
    chosen_BK, index_BK = logits_BE.topk(model.top_k, dim=-1)
    weights_BK = F.softmax(chosen_BK, -1) if model.gate_weights == "softmax" else chosen_BK
    rows = []
    for b in range(x.shape[0]):
        rows.append(sum(weights_BK[b, j] * modules[int(e)](x[b:b + 1])[0][0]
                        for j, e in enumerate(index_BK[b])))
    return torch.stack(rows), index_BK


@pytest.mark.parametrize("arch", ["mnist", "patch_cubic"])
@pytest.mark.parametrize("k", [1, 2])
def test_topk_equals_per_sample_reference(arch, k):
    model = make_moe(arch, "topk", num_experts=4, top_k=k)
    unused = 3
    with torch.no_grad():  # expert 3 is never chosen: a zero-sample expert in the dispatch
        if arch == "mnist":
            model.gate.out.bias[unused] = -1e3
        else:
            model.gate.linear.weight.copy_(0.1 * torch.randn_like(model.gate.linear.weight))
            model.gate.linear.weight[unused] = -model.gate.linear.weight[:unused].abs().sum(0) * 50
    modules = model.experts.to_modules()
    gate = copy.deepcopy(model.gate)
    x = torch.randn(9, *ARCHS[arch][2], dtype=torch.float64)
    if arch == "patch_cubic":
        x = x.abs()  # positive patch sums: the pushed-down router row stays last
    out = model(x)
    ref_BC, index_BK = topk_reference(model, modules, gate, x)
    assert out.expert_index.tolist() == index_BK.tolist()
    assert out.expert_outputs is None
    assert out.samples_per_expert[unused] == 0
    assert out.samples_per_expert.sum() == 9 * k
    torch.testing.assert_close(out.output, ref_BC, **TOL)
    top_ref = torch.stack([modules[int(index_BK[b, 0])](x[b:b + 1])[0][0] for b in range(9)])
    torch.testing.assert_close(out.top_expert_output, top_ref, **TOL)
    w = torch.randn_like(ref_BC)
    (out.output * w).sum().backward()
    (ref_BC * w).sum().backward()
    assert_grads_match(model.experts, modules)
    for p, q in zip(model.gate.parameters(), gate.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


def test_topk_with_batchnorm_equals_per_expert_batches():
    """CIFAR experts in top-k: each expert's BatchNorm sees exactly the samples routed to it."""
    model = make_moe("cifar100", "topk", num_experts=3, top_k=2)
    modules = model.experts.to_modules()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    y_BKC = torch.zeros(5, 2, 100, dtype=torch.float64)
    for e, m in enumerate(modules):
        b_idx, slot = (out.expert_index == e).nonzero(as_tuple=True)
        if len(b_idx):
            y_BKC[b_idx, slot] = m(x[b_idx])[0]
    chosen_BK = gate_logits(model, x).gather(1, out.expert_index)
    ref_BC = (F.softmax(chosen_BK, -1)[..., None] * y_BKC).sum(1)
    torch.testing.assert_close(out.output, ref_BC, **TOL)
    w = torch.randn_like(ref_BC)
    (out.output * w).sum().backward()
    (ref_BC * w).sum().backward()
    assert_grads_match(model.experts, modules)
    for name, buf in model.experts.named_buffers():
        torch.testing.assert_close(buf, torch.stack([dict(m.named_buffers())[name] for m in modules]), **TOL)


def test_chen_raw_gating_output_is_router_value_times_expert_logits():
    """Chen et al. (B.2): j* = argmax(h + r), r ~ U[0,1); output = (h_j* + r_j*) * f_j*(x)."""
    model = make_moe("patch_cubic", "topk", num_experts=4, gate_weights="raw", noise="uniform")
    with torch.no_grad():
        model.gate.linear.weight.normal_(0, 0.05)
    modules = model.experts.to_modules()
    router = copy.deepcopy(model.gate)
    x = torch.randn(7, 200, dtype=torch.float64)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    r_BE = torch.rand(7, 4, dtype=torch.float64)
    h_BE = x.view(7, 4, 50).sum(1) @ router.linear.weight.t()
    j_B = (h_BE + r_BE).argmax(-1)
    g_B = (h_BE + r_BE)[torch.arange(7), j_B]
    ref_BC = torch.stack([g_B[b] * modules[int(j_B[b])](x[b:b + 1])[0][0] for b in range(7)])
    assert out.output_kind == "logits"
    torch.testing.assert_close(out.output, ref_BC, **TOL)
    torch.testing.assert_close(out.gate_probs, F.softmax(h_BE + r_BE, -1), **TOL)
    # eval mode: no noise unless moe.eval_noise
    model.eval()
    assert torch.equal(model(x).expert_index[:, 0], h_BE.argmax(-1))
    model.eval_noise = True
    torch.manual_seed(5)
    assert torch.equal(model(x).expert_index[:, 0], j_B)


def test_gaussian_noise_uses_noise_std():
    model = make_moe("mnist", "topk", num_experts=4, noise="gaussian", noise_std=0.3)
    gate = copy.deepcopy(model.gate)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(9)
    out = model(x)
    torch.manual_seed(9)
    noisy_BE = gate(x) + 0.3 * torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(out.gate_probs, F.softmax(noisy_BE, -1), **TOL)


@pytest.mark.parametrize("routing,arch", [("dense", "mnist"), ("attentive", "mnist"),
                                          ("topk", "mnist"), ("topk", "patch_cubic"),
                                          ("dense", "cifar100")])
def test_gate_stays_float32_under_autocast(routing, arch):
    model_arch = "patch_cnn" if arch.startswith("patch") else arch
    classes = {"patch_cnn": 2, "cifar100": 100}.get(model_arch, 10)
    model = build_model(ModelConfig(arch=model_arch),
                        MoEConfig(num_experts=3, routing=routing,
                                  noise="uniform" if routing == "topk" else "none"),
                        LossConfig(importance_weight=0.2, ls_beta=1e-6, ls_gamma=1e-6),
                        classes, ARCHS[arch][2])
    x = torch.randn(4, *ARCHS[arch][2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = -out.output.float().clamp_min(1e-7).log().mean() + sum(out.aux_losses.values())
    assert out.gate_probs.dtype == torch.float32
    assert out.output.dtype == torch.float32
    assert set(out.aux_losses) == {"importance", "sample_similarity"}
    assert all(v.dtype == torch.float32 for v in out.aux_losses.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.gate_parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.expert_parameters() if p.grad is not None)


@pytest.mark.parametrize("gate_class,kwargs", [(MnistGate, {}), (MnistGate, {"kernel_size": 5}),
                                               (FmnistGate, {}), (CifarGate, {})])
def test_distillation_copies_the_attentive_trunk(gate_class, kwargs):
    """docs/papers.md A.8: strict=False copy; only the original gate's output layer stays fresh."""
    attentive = gate_class(5, attentive=True, **kwargs)
    original = gate_class(5, attentive=False, **kwargs)
    result = original.load_state_dict(attentive.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["out.bias", "out.weight"]
    assert result.unexpected_keys == []
    for key, value in attentive.state_dict().items():
        assert torch.equal(original.state_dict()[key], value), key
    assert any(k.startswith("bn") for k in attentive.state_dict()) == (gate_class is not MnistGate)


# ----------------------------------------------------------------------------- build_model


def test_build_single_and_patch_widths():
    single = build_model(ModelConfig(arch="patch_cnn", kind="single"), MoEConfig(), LossConfig(), 2, (200,))
    assert isinstance(single, SingleModel) and single.expert.conv.out_channels == 80
    out = single(torch.randn(3, 200))
    assert out.output_kind == "logits" and out.gate_probs is None and out.aux_losses == {}
    assert single.gate_parameters() == [] and len(single.expert_parameters()) == 2
    moe = build_model(ModelConfig(arch="patch_cnn", expert_init_scale=0.001),
                      MoEConfig(num_experts=8, routing="topk", gate_weights="raw", noise="uniform"),
                      LossConfig(), 2, (200,))
    assert moe.experts.conv.weight.shape == (8, 16, 1, 50)
    assert moe.experts.conv.weight.abs().max() <= 0.001 / math.sqrt(50)
    assert isinstance(moe.gate, PatchRouter) and moe.gate.linear.weight.abs().sum() == 0
    attentive = build_model(ModelConfig(arch="cifar100"), MoEConfig(num_experts=2, routing="attentive"),
                            LossConfig(), 100, (3, 32, 32))
    assert isinstance(attentive.attention, ExpertAttention)
    n_gate = sum(p.numel() for p in attentive.gate_parameters())
    assert n_gate == numel(attentive.gate) + 2 * 256 * 256


@pytest.mark.parametrize("model_cfg,moe_cfg,classes,shape,match", [
    (ModelConfig(arch="patch_cnn"), MoEConfig(routing="attentive"), 2, (200,), "attentive"),
    (ModelConfig(arch="mnist"), MoEConfig(num_experts=2, top_k=3, routing="topk"), 10, (1, 28, 28), "top_k"),
    (ModelConfig(arch="mnist"), MoEConfig(), 12, (1, 28, 28), "classes"),
    (ModelConfig(arch="cifar100"), MoEConfig(), 100, (1, 28, 28), "shape"),
    (ModelConfig(arch="patch_cnn"), MoEConfig(), 2, (199,), "patches"),
])
def test_build_model_rejects_impossible_combinations(model_cfg, moe_cfg, classes, shape, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_model(model_cfg, moe_cfg, LossConfig(), classes, shape)
    assert "\n" not in str(info.value)
