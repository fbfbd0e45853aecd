"""Layers of the PyTorch twin: Linear, the norms and the MLP; jax_model/layers.py is the same file in JAX.
The token mixers are attention.py and gla.py, the block that combines them block.py.

Notation: B batch, T tokens, D model dim, F ffn dim.
Dtype policy (every file of the twin): parameters in `param_dtype`, matmuls in `compute_dtype`; norms,
activations, RoPE, softmax, gates and recurrences computed in float32 and cast back.
Init: modules are built with placeholder values (zeros; a norm's weight ones); every tensor's init is the layout
table's rule (shared_config/layout.py, e.g. DyT's alpha from attn/ffn/final_alpha_init by slot), drawn by
`draw_weights` (weights.py) or loaded from a file.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared_config import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def at_hand(x: torch.Tensor) -> bool:
    """Whether `x`'s values can be read on the host without waiting on a device: a tensor on the CPU, uncompiled (a
    host-side check reads them there; on a GPU it would stall the step it runs beside)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class Linear(nn.Linear):
    """y = x · Wᵀ with W stored [out, in], computed in `compute_dtype` (as nnx.Linear's `dtype`)."""

    def __init__(self, d_in: int, d_out: int, spec: ModelSpec):
        super().__init__(d_in, d_out, bias=False, dtype=DTYPES[spec.param_dtype])
        self.compute_dtype = DTYPES[spec.compute_dtype]

    def reset_parameters(self):
        pass  # weights are drawn after construction, from the layout table

    def forward(self, x):
        return linear(x, self.weight, self.compute_dtype)


def linear(x_BTD, w_FD, dtype):
    """x · Wᵀ [.., D] x [F, D] -> [.., F] in `dtype` (nn.Linear's matmul, W stored [out, in])."""
    return F.linear(x_BTD.to(dtype), w_FD.to(dtype))


class WorkingCopy(torch.autograd.Function):
    """`copy`, the weight `master` already cast to the compute dtype (the train step's working weights), read in its
    place: the forward reads `copy`, the backward hands `master` the gradient cast to master's dtype, as the cast
    `master.to(copy.dtype)` would. The same values and gradients as casting master at each use, bit for bit, for a
    weight the forward reads once (jax_model/layers.py: a jax.custom_vjp)."""

    @staticmethod
    def forward(ctx, master, copy):
        ctx.dtype = master.dtype  # the residual carries master's dtype only
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype), None  # the copy is state, not a parameter: no gradient


working_copy = WorkingCopy.apply


def recomputed(fn):
    """`fn(x)` whose intermediates the backward recomputes from x instead of reading them back (non-reentrant
    torch.utils.checkpoint over the whole of `fn`), when x is narrower than float32 and grad is on. For the float32
    work between matmuls (norms, activations): a bf16 step then keeps its bf16 inputs for the backward, not the
    float32 tensors computed from them (per token and layer of `small`: 10 KB instead of 53 KB). A float32 x is
    kept as it is (nothing narrower to keep; eager torch would pay ~0.4 ms a call for the recompute). Same values;
    the backward recomputes a few elementwise ops."""
    return lambda x: (fn(x) if x.dtype == torch.float32 or not torch.is_grad_enabled()
                      else checkpoint(fn, x, use_reentrant=False))


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight (+ bias)."""

    def __init__(self, dim: int, eps: float, bias: bool, param_dtype: str):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPES[param_dtype]))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=DTYPES[param_dtype])) if bias else None

    def forward(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        x32 = x.to(torch.float32)  # statistics in float32
        y = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return affine(y, self.weight, self.bias).to(x.dtype)


class LayerNorm(nn.Module):
    """(x − mean) · rsqrt(var + eps) · weight (+ bias)."""

    def __init__(self, dim: int, eps: float, bias: bool, param_dtype: str):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPES[param_dtype]))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=DTYPES[param_dtype])) if bias else None

    def forward(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        x32 = x.to(torch.float32)  # statistics in float32
        centered = x32 - torch.mean(x32, dim=-1, keepdim=True)
        y = centered * torch.rsqrt(torch.mean(centered * centered, dim=-1, keepdim=True) + self.eps)
        return affine(y, self.weight, self.bias).to(x.dtype)


class DynamicTanh(nn.Module):
    """DyT (arXiv 2503.10622): weight · tanh(alpha · x) (+ bias), alpha a learnable scalar."""

    def __init__(self, dim: int, bias: bool, param_dtype: str):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, dtype=DTYPES[param_dtype]))  # a placeholder (module docstring)
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPES[param_dtype]))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=DTYPES[param_dtype])) if bias else None

    def forward(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        y = torch.tanh(self.alpha.to(torch.float32) * x.to(torch.float32))  # in float32
        return affine(y, self.weight, self.bias).to(x.dtype)


class DynamicErf(nn.Module):
    """Derf (arXiv 2512.10938): weight · erf(alpha · x + shift) (+ bias), alpha and shift learnable scalars."""

    def __init__(self, dim: int, bias: bool, param_dtype: str):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, dtype=DTYPES[param_dtype]))  # placeholders (module docstring)
        self.shift = nn.Parameter(torch.zeros(1, dtype=DTYPES[param_dtype]))
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPES[param_dtype]))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=DTYPES[param_dtype])) if bias else None

    def forward(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        z = self.alpha.to(torch.float32) * x.to(torch.float32) + self.shift.to(torch.float32)
        return affine(torch.erf(z), self.weight, self.bias).to(x.dtype)  # in float32


def affine(y, weight, bias):
    """y · weight (+ bias), in float32."""
    y = y * weight.to(torch.float32)
    return y if bias is None else y + bias.to(torch.float32)


def make_norm(spec: ModelSpec, dim: int | None = None):
    """The norm every slot of `spec` uses, over the model dim (or `dim`: GLA's per-head output norm)."""
    D, eps, bias, dtype = dim or spec.D, spec.norm_eps, spec.norm_bias, spec.param_dtype
    if spec.norm_type == "rms":
        return RMSNorm(D, eps, bias, dtype)
    if spec.norm_type == "layernorm":
        return LayerNorm(D, eps, bias, dtype)
    if spec.norm_type == "dyt":
        return DynamicTanh(D, bias, dtype)
    if spec.norm_type == "derf":
        return DynamicErf(D, bias, dtype)
    # a value added to the spec's CHOICES but not here would otherwise build another norm's class
    raise ValueError(f"make_norm: no norm class for norm_type={spec.norm_type!r} (docs/extending.md)")


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate="none"),  # exact erf form (torch's default)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: torch.square(F.relu(x)),
}


class MLP(nn.Module):
    """The block's MLP [B, T, D] -> [B, T, D]: SwiGLU (silu(x W_gate) · x W_up, the two as one matmul at compute
    time) or an activation of x W_up (`spec.mlp`), then W_down; the activation in float32."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.kind = spec.mlp
        self.gate_proj = Linear(spec.D, spec.F, spec) if spec.mlp == "swiglu" else None
        self.up_proj = Linear(spec.D, spec.F, spec)
        self.down_proj = Linear(spec.F, spec.D, spec)

    def forward(self, x_BTD):
        # gate and up as one [D, 2F] matmul (the layout keeps two tensors; compute joins them)
        if self.kind == "swiglu":
            w_2FD = torch.cat([self.gate_proj.weight, self.up_proj.weight])
            h_BTF = recomputed(partial(swiglu, dtype=x_BTD.dtype))(linear(x_BTD, w_2FD, self.up_proj.compute_dtype))
        else:
            h_BTF = recomputed(partial(activate, ACTIVATIONS[self.kind], dtype=x_BTD.dtype))(self.up_proj(x_BTD))
        return self.down_proj(h_BTF)


def swiglu(gate_up_BT2F, dtype):
    """silu(gate) · up in float32, cast to `dtype`: gate and up are the halves of the joined projection [.., 2F]."""
    gate_BTF, up_BTF = gate_up_BT2F.to(torch.float32).chunk(2, dim=-1)
    return (F.silu(gate_BTF) * up_BTF).to(dtype)


def activate(activation, x_BTF, dtype):
    """activation(x) in float32, cast to `dtype`."""
    return activation(x_BTF.to(torch.float32)).to(dtype)
