"""Layers of the JAX twin (Flax NNX): Linear, the norms and the MLP; torch_model/layers.py is the same file in PyTorch.
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

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shared_config import ModelSpec
from shared_config.parallel import AXES, splits_rows

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ZEROS = nnx.initializers.zeros_init()  # Linear/Embed weights are drawn after construction, from the layout table


def at_hand(x: jax.Array) -> bool:
    """Whether `x`'s values can be read on the host without waiting on a device: an array on the CPU, outside jit (a
    host-side check reads them there; on a GPU it would stall the step it runs beside)."""
    return not isinstance(x, jax.core.Tracer) and {d.platform for d in x.devices()} == {"cpu"}


class Linear(nnx.Linear):
    """y = x · W with W stored [in, out] (nnx.Linear's kernel); the canonical file stores Wᵀ."""

    def __init__(self, d_in: int, d_out: int, spec: ModelSpec, rngs: nnx.Rngs):
        super().__init__(
            d_in, d_out, use_bias=False, kernel_init=ZEROS,
            dtype=DTYPES[spec.compute_dtype], param_dtype=DTYPES[spec.param_dtype], rngs=rngs,
        )
        self.mesh: Mesh | None = None  # the mesh a sharded step runs on (model.set_mesh): the weight read whole

    @property
    def compute_dtype(self):
        """The matmul's dtype (nnx.Linear's `dtype`; the torch twin's attribute of this name)."""
        return self.dtype

    def __call__(self, x):
        return linear(x, gathered(self.kernel[...], self.mesh), self.compute_dtype)


def linear(x_BTD, w_DF, dtype):
    """x · W [.., D] x [D, F] -> [.., F] in `dtype` (nnx.Linear's matmul). On CPU the tokens are flattened to one
    dim: XLA:CPU runs the backward of a matmul with two batch-like dims (B, T) about 2x slower than the same matmul
    over B·T rows. Elsewhere it gains nothing and, on a sharded mesh, makes XLA regather the weight gradients."""
    if jax.default_backend() != "cpu":
        return jnp.dot(x_BTD.astype(dtype), w_DF.astype(dtype))
    return jnp.dot(x_BTD.reshape(-1, x_BTD.shape[-1]).astype(dtype), w_DF.astype(dtype)).reshape(*x_BTD.shape[:-1], -1)


def split_rows(x_B, mesh: Mesh | None):
    """x [B, ...] with its rows split over `mesh`'s data × fsdp devices, as distributed.py splits a batch
    (jax.lax.with_sharding_constraint); no mesh, or rows the devices do not divide evenly: x as it is.

    The hidden states [B, T, D] are pinned so after the embeddings and after every block (model.py), as MaxText pins
    its activations. XLA's sharding propagation then gathers each fsdp-split weight where a matmul reads it, which is
    FSDP. Left to itself, it split the LM head's and the MLP's contractions over fsdp instead and all-reduced the
    partial logits and activations (jax 0.10 and 0.11): more bytes moved, and a bf16 step rounded differently from
    one device's. A GLA layer pins its heads and state too (gla.py): in prefill and decode XLA split them by heads,
    after the fsdp-split projections, and replicated them on every device to reach the state's rows.
    """
    if mesh is None or not splits_rows(x_B.shape[0], mesh.size):
        return x_B
    return jax.lax.with_sharding_constraint(x_B, NamedSharding(mesh, PartitionSpec(AXES)))


def gathered(w, mesh: Mesh | None):
    """Weight `w` whole on every device of `mesh` where it is read: FSDP's all-gather, and in the backward its
    gradient summed over the devices back to w's shards; no mesh, or one device: w as it is.

    Every Linear (and the embedding lookup, model.lookup) reads its weight so. Left to XLA, a matmul whose tokens
    took fewer bytes than its weight kept the weight split and moved the tokens instead: a routed block's gathered
    tokens [B, k, D] were all-gathered, its hidden states split by columns (heads, F) and exchanged (all-to-all),
    forward and backward, and parts of it ran for every row on several devices, its attention's softmax over
    all-reduced scores [B, K, H/K, k, k] among them (mod at B·k = 72 tokens of D 48 against a [48, 80] weight; a
    routed eval step did 1.2/W of one device's flops per device). An embedding table split over fsdp by D sent its
    gradient's rows-split cotangent [B, T, D] to D-split over fsdp, replicated over data: on a data × fsdp mesh XLA
    could only replicate it on every device ("Involuntary full rematerialization")."""
    if mesh is None or mesh.size == 1:
        return w
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec()))


@jax.custom_vjp
def working_copy(master, copy):
    """`copy`, the weight `master` already cast to the compute dtype (the train step's working weights), read in its
    place: the forward reads `copy`, the backward hands `master` the gradient cast to master's dtype, as the cast
    `master.astype(copy.dtype)` would. The same values and gradients as casting master at each use, bit for bit,
    for a weight the forward reads once (jax.custom_vjp; torch_model/layers.py: a torch.autograd.Function)."""
    return copy


def _working_copy_forward(master, copy):
    return copy, jnp.zeros((), master.dtype)  # the residual carries master's dtype only


def _working_copy_backward(like, g):
    return g.astype(like.dtype), None  # the copy is state, not a parameter: no gradient


working_copy.defvjp(_working_copy_forward, _working_copy_backward)


def recomputed(fn):
    """`fn(x)` whose intermediates the backward recomputes from x instead of reading them back (jax.checkpoint over
    the whole of `fn`), when x is narrower than float32. For the float32 work between matmuls (norms, activations):
    a bf16 step then keeps its bf16 inputs for the backward, not the float32 tensors computed from them (per token
    and layer of `small`: 10 KB instead of 53 KB). A float32 x is kept as it is (nothing narrower to keep; eager
    torch would pay for the recompute). Same values; the backward recomputes a few elementwise ops."""
    return lambda x: fn(x) if x.dtype == jnp.float32 else jax.checkpoint(fn)(x)


class RMSNorm(nnx.Module):
    """x · rsqrt(mean(x²) + eps) · weight (+ bias)."""

    def __init__(self, dim: int, eps: float, bias: bool, param_dtype: str):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), DTYPES[param_dtype]))
        self.bias = nnx.Param(jnp.zeros((dim,), DTYPES[param_dtype])) if bias else None

    def __call__(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        x32 = x.astype(jnp.float32)  # statistics in float32
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return affine(y, self.weight, self.bias).astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x − mean) · rsqrt(var + eps) · weight (+ bias)."""

    def __init__(self, dim: int, eps: float, bias: bool, param_dtype: str):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), DTYPES[param_dtype]))
        self.bias = nnx.Param(jnp.zeros((dim,), DTYPES[param_dtype])) if bias else None

    def __call__(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        x32 = x.astype(jnp.float32)  # statistics in float32
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        return affine(y, self.weight, self.bias).astype(x.dtype)


class DynamicTanh(nnx.Module):
    """DyT (arXiv 2503.10622): weight · tanh(alpha · x) (+ bias), alpha a learnable scalar."""

    def __init__(self, dim: int, bias: bool, param_dtype: str):
        self.alpha = nnx.Param(jnp.zeros((1,), DTYPES[param_dtype]))  # a placeholder (module docstring)
        self.weight = nnx.Param(jnp.ones((dim,), DTYPES[param_dtype]))
        self.bias = nnx.Param(jnp.zeros((dim,), DTYPES[param_dtype])) if bias else None

    def __call__(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        y = jnp.tanh(self.alpha[...].astype(jnp.float32) * x.astype(jnp.float32))  # in float32
        return affine(y, self.weight, self.bias).astype(x.dtype)


class DynamicErf(nnx.Module):
    """Derf (arXiv 2512.10938): weight · erf(alpha · x + shift) (+ bias), alpha and shift learnable scalars."""

    def __init__(self, dim: int, bias: bool, param_dtype: str):
        self.alpha = nnx.Param(jnp.zeros((1,), DTYPES[param_dtype]))  # placeholders (module docstring)
        self.shift = nnx.Param(jnp.zeros((1,), DTYPES[param_dtype]))
        self.weight = nnx.Param(jnp.ones((dim,), DTYPES[param_dtype]))
        self.bias = nnx.Param(jnp.zeros((dim,), DTYPES[param_dtype])) if bias else None

    def __call__(self, x):
        return recomputed(self.normalize)(x)

    def normalize(self, x):
        z = self.alpha[...].astype(jnp.float32) * x.astype(jnp.float32) + self.shift[...].astype(jnp.float32)
        return affine(jax.lax.erf(z), self.weight, self.bias).astype(x.dtype)  # in float32


def affine(y, weight, bias):
    """y · weight (+ bias), in float32."""
    y = y * weight[...].astype(jnp.float32)
    return y if bias is None else y + bias[...].astype(jnp.float32)


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
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form (jax's default is tanh)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}


class MLP(nnx.Module):
    """The block's MLP [B, T, D] -> [B, T, D]: SwiGLU (silu(x W_gate) · x W_up, the two as one matmul at compute
    time) or an activation of x W_up (`spec.mlp`), then W_down; the activation in float32."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        self.kind = spec.mlp
        self.gate_proj = Linear(spec.D, spec.F, spec, rngs) if spec.mlp == "swiglu" else None
        self.up_proj = Linear(spec.D, spec.F, spec, rngs)
        self.down_proj = Linear(spec.F, spec.D, spec, rngs)

    def __call__(self, x_BTD):
        # gate and up as one [D, 2F] matmul (the layout keeps two tensors; compute joins them)
        if self.kind == "swiglu":
            w_D2F = jnp.concatenate([gathered(self.gate_proj.kernel[...], self.gate_proj.mesh),
                                     gathered(self.up_proj.kernel[...], self.up_proj.mesh)], axis=1)
            h_BTF = recomputed(partial(swiglu, dtype=x_BTD.dtype))(linear(x_BTD, w_D2F, self.up_proj.compute_dtype))
        else:
            h_BTF = recomputed(partial(activate, ACTIVATIONS[self.kind], dtype=x_BTD.dtype))(self.up_proj(x_BTD))
        return self.down_proj(h_BTF)


def swiglu(gate_up_BT2F, dtype):
    """silu(gate) · up in float32, cast to `dtype`: gate and up are the halves of the joined projection [.., 2F]."""
    gate_BTF, up_BTF = jnp.split(gate_up_BT2F.astype(jnp.float32), 2, axis=-1)
    return (jax.nn.silu(gate_BTF) * up_BTF).astype(dtype)


def activate(activation, x_BTF, dtype):
    """activation(x) in float32, cast to `dtype`."""
    return activation(x_BTF.astype(jnp.float32)).astype(dtype)
