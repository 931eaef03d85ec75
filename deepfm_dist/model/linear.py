"""The MLP's Linear layers on CPU: fp32 through oneDNN instead of MKL (``model.linear_kernel``).

On the AMD EPYC (Zen 5) dev machines, ``torch.nn.Linear`` goes to MKL's sgemm, which runs
its AVX2 code on non-Intel CPUs: ~100 GFLOP/s per core. oneDNN picks its kernels by CPU
features (AVX-512 here) and runs the same fp32 products at ~190-245 GFLOP/s per core, with
fp32 accumulation (results differ from MKL's only by summation order, ~1e-6 relative).
``torch.ops.mkldnn._linear_pointwise`` is that kernel on ordinary strided tensors; it has no
autograd formula, so ``OneDNNLinear`` supplies one (three matmuls, all through oneDNN):

    y = x W^T + b,   dx = dy W,   dW = dy^T x,   db = sum_B dy

Why: MKL runs its AVX2 code on AMD CPUs, oneDNN its AVX-512 kernels (figures in the
benchmark reports). On CUDA tensors (and other dtypes or shapes) the layer is a
plain ``nn.Linear``: one code path, the kernel chosen by where the tensors live.

Under CPU bf16 autocast (``train.precision=bf16``) the same three matmuls run in bf16 with
fp32 accumulation: input, weight and bias are cast to bf16 (the weights stay fp32, autograd
casts their gradients back), so on CPUs with AVX512-BF16 or AMX oneDNN runs them at about
about twice the fp32 rate. This is what
autocast does for ``nn.Linear`` too; the custom op is not on autocast's list, so it is done here.

``linear_class(kernel)`` is what ``DeepTower`` builds its layers with; a ``OneDNNLinear`` has
the parameters and state-dict keys of ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from deepfm_dist.config import LINEAR_KERNELS


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T (+ bias) by oneDNN; a [M, K], b [N, K], strided views allowed."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mm_t(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm_t(grad, weight.t())  # dy W
        if ctx.needs_input_grad[1]:
            grad_w = _mm_t(grad.t(), x.t())  # dy^T x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def cpu_compute_dtype() -> torch.dtype:
    """bf16 inside a CPU bf16 autocast region, else fp32."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose CPU 2-D forward and backward run on oneDNN, in fp32 or (under CPU
    bf16 autocast) bf16; anything else (CUDA, other dtypes or shapes) is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.with_weight(x, self.weight)

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This layer's kernel with another weight [out, K] (a function of the parameters)."""
        if x.device.type == "cpu" and x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16):
            dtype = cpu_compute_dtype()
            if dtype == torch.bfloat16 or x.dtype == torch.float32:
                bias = self.bias.to(dtype) if self.bias is not None else None
                return _OneDNNLinearFunction.apply(x.to(dtype), weight.to(dtype), bias)
        return nn.functional.linear(x, weight, self.bias)


def linear_with_weight(layer: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer`` (nn.Linear or OneDNNLinear) applied with ``weight`` in place of its own, on
    the layer's kernel: x [B, K], weight [out, K] -> [B, out]."""
    if isinstance(layer, OneDNNLinear):
        return layer.with_weight(x, weight)
    return nn.functional.linear(x, weight, layer.bias)


def linear_class(kernel: str) -> type[nn.Linear]:
    """The Linear class for ``model.linear_kernel``: ``auto`` and ``onednn`` use oneDNN on CPU
    where PyTorch has it (``onednn`` is not an error elsewhere: the layer falls back to
    nn.Linear, so a config stays valid on any host); ``torch`` is always ``nn.Linear``."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel {kernel!r}: expected one of {', '.join(LINEAR_KERNELS)}")
    return OneDNNLinear if kernel != "torch" and onednn_available() else nn.Linear
