"""Native CPU kernels: the pooled convolution blocks (``csrc/pool_blocks.cpp``, here) and the
segment sums of top-k dispatch (``csrc/segments.cpp``, used by ``moe_dist.parallel.segments``).

The FashionMNIST gate's "conv, BatchNorm, ReLU, 2x2 max-pool" block and the experts' "conv,
ReLU, 2x2 max-pool" block spend most of their time in PyTorch on passes over a [C, 4, M]
product that does not fit in cache (docs/design.md, "Choice 1: Experts as one bank"). The C++
kernels recompute the 9-term product block by block from the pooling-phase columns and never
write it; sums that feed statistics and weight gradients are added in double. They compute the
same function as :class:`moe_dist.models.layers._ConvBatchNormReluPool` and
``_ConvReluPool`` (the tests hold them to each other and to nn's modules).

The library is built on first use by ``torch.utils.cpp_extension`` (a few seconds with g++
and ninja; ``-O3 -march=native -fopenmp``, and without OpenMP or ``-march=native`` where the
compiler lacks them: one thread, a generic target, after a warning; ``FLAG_SETS``), in a
folder keyed by the sources, the flags and the CPU's feature flags (see :func:`_build_key`)
and called through ``ctypes``, which releases the GIL. Where it cannot be built (no
compiler), or with ``MOE_DIST_NATIVE=0``, the PyTorch path runs instead, after one warning.
Only plain float32 CPU tensors take this path: CUDA,
other dtypes, inputs that need a gradient, autocast and ``torch.func`` transforms stay on
the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("pool_blocks.cpp", "segments.cpp"))
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "gate_forward": [_P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P],
    "gate_output": [_P, _P, _P, _P, _I64, _I64, _P, _P],
    "gate_backward_sums": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P],
    "experts_pool": [_P, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _P],
    "experts_pool_backward": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P, _P],
    "segment_sum": [_P, _I64, _P, _P, _P, _P, _I64, _P],
    "segment_sum_backward": [_P, _P, _I64, _P, _P, _P, _P, _I64, _P, _P],
}
# Compiler flags, best first. -fopenmp: the kernels run on OpenMP's pool, which at run time is
# PyTorch's own libgomp. Where the compiler has no OpenMP (Apple's clang) the next set builds
# the same kernels to run on one thread; where it does not know -march=native, the last one
# builds them for its default target.
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))
_lock = threading.Lock()
_state: dict[str, object] = {}
STALE_LOCK_S = 300  # a build takes seconds; an older lock was left by a killed process


def _build_key(flags: tuple[str, ...] = FLAG_SETS[0]) -> str:
    """A short hash of what the library is built from and for: the sources, the compiler
    flags, what ``-march=native`` compiles for (machine, CPU feature flags) and the torch
    installation it links (version, place). One folder per key, so that two versions of
    moe_dist or two environments on one machine, or nodes with different CPUs sharing a home
    directory, never rebuild (and overwrite) each other's library."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                cpu = line
                break
    except OSError:
        pass
    target = (f"{platform.machine()} {cpu} torch {torch.__version__} {Path(torch.__file__).parent} "
              f"{' '.join(flags)}")
    return hashlib.sha256(target.encode() + b"".join(path.read_bytes() for path in SOURCES)).hexdigest()[:12]


def _build() -> ctypes.CDLL:
    """The library built with the first of ``FLAG_SETS`` the compiler takes (warned when it is
    not the first: the kernels then run on one thread, or for a generic target)."""
    failures = []
    for flags in FLAG_SETS:
        try:
            lib = _build_with(flags)
        except Exception as err:  # noqa: BLE001  (the compiler's error, whatever the builder raised)
            failures.append(f"{' '.join(flags)}: {_first_error(err)}")
            continue
        if failures:
            warnings.warn(f"moe_dist: native CPU kernels built with {' '.join(flags)} only ({'; '.join(failures)})",
                          RuntimeWarning, stacklevel=3)
        return lib
    raise RuntimeError("; ".join(failures))


def _first_error(err: Exception) -> str:
    """The compiler's first error line from a failed build's message (else its last line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
    return next((line for line in lines if "error" in line.lower() and "Error building" not in line), lines[-1])


def _build_with(flags: tuple[str, ...]) -> ctypes.CDLL:
    from torch.utils.cpp_extension import load

    try:  # the ninja that pip installed with moe_dist, whether or not its environment is active
        import ninja
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    cache = Path(os.environ.get("MOE_DIST_CACHE", Path.home() / ".cache" / "moe_dist"))
    name = f"moe_dist_native_{_build_key(flags)}"
    build_dir = cache / "native" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(build_dir / "lock")
    path = load(name, [str(path) for path in SOURCES], extra_cflags=list(flags),
                extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], build_directory=str(build_dir),
                is_python_module=False, verbose=False)
    lib = ctypes.CDLL(str(path))
    for fn, argtypes in _SIGNATURES.items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = None
    return lib


def _remove_stale_lock(lock: Path) -> None:
    """torch's extension builder waits for as long as its lock file exists; a process killed
    while building (a preempted job's first step) leaves one behind for good."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            warnings.warn(f"moe_dist: removed a stale build lock {lock}", RuntimeWarning, stacklevel=3)
    except FileNotFoundError:
        pass


def enabled() -> bool:
    """``MOE_DIST_NATIVE``: 1 (default) uses the native kernels where they apply, 0 never."""
    value = os.environ.get("MOE_DIST_NATIVE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MOE_DIST_NATIVE={value!r}: allowed values are 1 (native kernels, the default) and 0")
    return value == "1"


def library() -> ctypes.CDLL | None:
    """The built kernels, or None where they are off or cannot be built (warned once)."""
    if not enabled():
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except Exception as err:  # no compiler, no ninja, a failed build: the PyTorch path runs
                _state["lib"] = None
                warnings.warn(f"moe_dist: native CPU kernels unavailable, using the PyTorch path ({err})",
                              RuntimeWarning, stacklevel=2)
        return _state["lib"]


def plain_cpu_float(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a float32 CPU tensor outside ``torch.func`` transforms: the only
    ones the kernels take (also for ``moe_dist.parallel.segments``)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not wrapped(t) for t in tensors)


def applies(cols: torch.Tensor, weight: torch.Tensor, *per_row: torch.Tensor, allow_empty: bool = False) -> bool:
    """Whether the native kernels can compute a block on ``[K, 4, M]`` columns (shared by
    every row of the weight) or ``[E, K, 4, M]`` ones (expert e's own, for a weight
    ``[E, O, K]``), a weight ``[..., K]`` and per-row parameters shaped like
    ``weight.shape[:-1]`` (bias; gamma, beta): plain float32 CPU tensors of matching shapes (a
    mismatch is left to the PyTorch path, which names it), columns that need no gradient, no
    autocast. No windows (M = 0) only with ``allow_empty`` (a rank without samples under
    global BatchNorm must take the path the others take). Whether the library is built here
    is :func:`runs`'s business."""
    lead = tuple(cols.shape[:-3])  # () shared, (E,) per expert
    per_expert = weight.dim() == 3 and lead == tuple(weight.shape[:1])
    shapes_match = (cols.dim() >= 3 and (lead == () or per_expert) and cols.shape[-2] == 4
                    and (cols.shape[-1] > 0 or allow_empty) and weight.shape[-1] == cols.shape[-3]
                    and all(p.shape == weight.shape[:-1] for p in per_row))
    return (shapes_match and not cols.requires_grad and plain_cpu_float(cols, weight, *per_row)
            and not torch.is_autocast_enabled("cpu"))


def runs(cols: torch.Tensor, weight: torch.Tensor, *per_row: torch.Tensor, allow_empty: bool = False) -> bool:
    """:func:`applies`, and the kernels are built (and on) in this process."""
    return applies(cols, weight, *per_row, allow_empty=allow_empty) and library() is not None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _gate_moments(lib, cols_K4M, weight_CK, gamma_C, stats):
    """This process's pass over the columns (winning phases and z there, z's and the columns'
    moments; zeros where it has no windows) and the statistics over the batch ``stats``
    spans: global count, mean and biased variance (double)."""
    K, _, M = cols_K4M.shape
    C = weight_CK.shape[0]
    wide = {"dtype": torch.float64}
    mean_l, var_l = torch.zeros(C, **wide), torch.zeros(C, **wide)
    colmean, comoment = torch.zeros(K, **wide), torch.zeros(K, K, **wide)
    best_CM, phase_CM = torch.empty(C, M, dtype=torch.float32), torch.empty(C, M, dtype=torch.uint8)
    if M > 0:
        lib.gate_forward(_ptr(cols_K4M), _ptr(weight_CK), _ptr(gamma_C), C, K, M, _ptr(mean_l), _ptr(var_l),
                         _ptr(colmean), _ptr(comoment), _ptr(best_CM), _ptr(phase_CM))
    count_1C = torch.full((1, C), 4.0 * M, **wide)
    count_1C, mean_1C, m2_1C = stats.combine(count_1C, mean_l[None], (var_l * 4.0 * M)[None])
    count = float(count_1C[0, 0])
    return best_CM, phase_CM, colmean, comoment, count, mean_1C[0], m2_1C[0] / max(count, 1.0)


class GateBlock(torch.autograd.Function):
    """``max_pool2d(relu(batch_norm(conv2d(x))), 2)`` in training mode, natively: the contract
    of ``layers._ConvBatchNormReluPool`` (pooled ``[C, M]`` output, the batch mean with the
    conv bias, the biased variance; and the count of positions behind them), for columns that
    need no gradient, on the statistics of the batch that ``stats`` spans: this process's
    (``LocalBatchStats``) or the global batch of several (``GroupBatchStats``: every rank
    takes this path, one with no windows included, so that the collectives pair up).

    BatchNorm's statistics are those of the float32 product, as accurate as a two-pass
    computation (blocks centred on their own mean, merged in double, ranks merged as
    SyncBatchNorm does). Backward needs ``sum_q dz[c, q] cols[k, q]`` with ``dz = scale (dy -
    mean(dy) - xhat mean(dy xhat))`` over the batch (two sums of C values added over the
    ranks); ``dy`` lives on the winning phases only, and the ``xhat`` term is ``W Cov`` from
    the columns' centred cross products (``Cov = sum (cols - mean)(cols - mean)^T``), so
    backward reads the columns only where a window's winning phase is. Each process returns
    its own windows' share of the parameter gradients (the engine sums replicas' gradients).
    """

    @staticmethod
    def forward(ctx, cols_K4M, weight_CK, bias_C, gamma_C, beta_C, eps, stats):
        lib = library()
        C, M = weight_CK.shape[0], cols_K4M.shape[2]
        cols_K4M, weight_CK = cols_K4M.contiguous(), weight_CK.detach().contiguous()
        gamma_C, beta_C = gamma_C.detach().contiguous(), beta_C.detach().contiguous()
        best_CM, phase_CM, colmean, comoment, count, mean64, var64 = _gate_moments(
            lib, cols_K4M, weight_CK, gamma_C, stats)
        mean_C, var_C = mean64.float(), var64.float()
        invstd_C = torch.rsqrt(var64 + eps).float()
        out_CM = torch.empty(C, M, dtype=torch.float32)
        if M > 0:
            lib.gate_output(_ptr(mean_C), _ptr(invstd_C), _ptr(gamma_C), _ptr(beta_C), C, M,
                            _ptr(best_CM), _ptr(out_CM))
        ctx.save_for_backward(cols_K4M, weight_CK, gamma_C, invstd_C, best_CM, phase_CM, out_CM, colmean, comoment)
        ctx.stats, ctx.count = stats, count
        mean_out, var_out = mean_C + bias_C.detach(), var_C
        count_out = torch.tensor(count, dtype=torch.float64)
        ctx.mark_non_differentiable(mean_out, var_out, count_out)
        ctx.set_materialize_grads(False)
        return out_CM, mean_out, var_out, count_out

    @staticmethod
    @once_differentiable  # backward runs outside autograd: a second derivative raises, never 0
    def backward(ctx, grad_CM, *_):
        if grad_CM is None:
            return None, None, None, None, None, None, None
        cols_K4M, weight_CK, gamma_C, invstd_C, best_CM, phase_CM, out_CM, colmean, comoment = ctx.saved_tensors
        K, _, M = cols_K4M.shape
        C, Q_l, Q = weight_CK.shape[0], 4.0 * M, max(ctx.count, 1.0)  # count 0: no sample anywhere, all sums 0
        wide = {"dtype": torch.float64}
        gsum, gxhat, gcols = torch.zeros(C, **wide), torch.zeros(C, **wide), torch.zeros(C, K, **wide)
        if M > 0:
            sign_C = torch.where(gamma_C < 0, -1.0, 1.0).to(gamma_C.dtype)
            library().gate_backward_sums(_ptr(grad_CM.contiguous()), _ptr(out_CM), _ptr(best_CM), _ptr(phase_CM),
                                         _ptr(cols_K4M), _ptr(sign_C), C, K, M, _ptr(gsum), _ptr(gxhat), _ptr(gcols))
        gsum_g, gxhat_g, colsum_g = ctx.stats.total(torch.cat([gsum, gxhat, Q_l * colmean])).split([C, C, K])
        w64 = weight_CK.double()
        # sum over this process's positions of (z - global mean) cols_k: W Cov, plus the shift
        # of the local mean from the global one (W (colmean - global colmean); 0 in one process)
        shift_C = w64 @ (colmean - colsum_g / Q) if ctx.stats.distributed else torch.zeros(C, **wide)
        centred_cols = w64 @ comoment + Q_l * shift_C.unsqueeze(1) * colmean
        invstd64, scale = invstd_C.double().unsqueeze(1), (gamma_C * invstd_C).double().unsqueeze(1)
        grad_weight = scale * (gcols - gsum_g.unsqueeze(1) / Q * Q_l * colmean
                               - gxhat_g.unsqueeze(1) / Q * invstd64 * centred_cols)
        need_bias = ctx.needs_input_grad[2]
        return (None, grad_weight.float(), torch.zeros_like(gamma_C) if need_bias else None,
                gxhat.float(), gsum.float(), None, None)


class ExpertsBlock(torch.autograd.Function):
    """``max_pool2d(relu(conv2d(x)), 2)`` for stacked experts, natively: the contract of
    ``layers._ConvReluPool`` (``[E, O, M]`` output) on shared ``[K, 4, M]`` columns or each
    expert's own ``[E, K, 4, M]``, for columns that need no gradient."""

    @staticmethod
    def forward(ctx, cols, weight_EOK, bias_EO):
        lib = library()
        E, O, K = weight_EOK.shape
        M = cols.shape[-1]
        cols = cols.contiguous()
        stride = K * 4 * M if cols.dim() == 4 else 0
        weight, bias = weight_EOK.detach().contiguous(), bias_EO.detach().contiguous()
        out_EOM = torch.empty(E, O, M, dtype=torch.float32)
        phase_EOM = torch.empty(E, O, M, dtype=torch.uint8)
        lib.experts_pool(_ptr(cols), stride, O, _ptr(weight), _ptr(bias), E * O, K, M,
                         _ptr(out_EOM), _ptr(phase_EOM))
        ctx.save_for_backward(cols, phase_EOM, out_EOM)
        ctx.shape = (E, O, K, stride)
        return out_EOM

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_EOM):
        lib = library()
        cols, phase_EOM, out_EOM = ctx.saved_tensors
        E, O, K, stride = ctx.shape
        M = cols.shape[-1]
        grad_EOM = grad_EOM.contiguous()
        gbias, gw = torch.empty(E, O, dtype=torch.float64), torch.empty(E, O, K, dtype=torch.float64)
        lib.experts_pool_backward(_ptr(grad_EOM), _ptr(out_EOM), _ptr(phase_EOM), _ptr(cols), stride, O,
                                  E * O, K, M, _ptr(gbias), _ptr(gw))
        return None, gw.float(), gbias.float()
