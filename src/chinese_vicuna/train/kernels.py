"""Training kernels: the same maths as the stock HF/PEFT modules, less memory and fewer passes.

``apply_training_kernels(model)`` swaps them into a model before training (``fast_kernels: true``,
the default). Each swap keeps the forward values of the module it replaces (tests compare them
with the stock modules) and differs only in what is kept for backward:

- ``lowmem_eager`` attention: eager attention without ``repeat_kv`` copies (grouped-query heads
  attend through a reshape) that keeps the attention probabilities once, in the compute dtype,
  instead of an fp32 copy plus a compute-dtype copy. On the CPU it is faster than torch's flash
  kernel at training lengths; on a GPU the trainer keeps ``sdpa``.
- RMSNorm (LLaMA/Mistral/Qwen formula) that keeps its input in the model dtype and the inverse
  RMS, instead of an fp32 copy of the input; backward recomputes the normalised rows.
- SwiGLU ``silu(gate) * up`` that keeps ``gate`` and ``up`` only; backward recomputes ``silu``.
- LoRA dropout that draws only the gaps between dropped positions (about n*p random numbers
  instead of n; torch's CPU generator is serial) into a 0/1 mask in the input's dtype; under
  autocast the LoRA input stays in the compute dtype instead of PEFT's round trip through fp32
  (the LoRA matmuls run in the compute dtype either way).

Written by hand because the libraries that do this (Liger kernels, unsloth) are Triton/CUDA only.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

LOWMEM_ATTENTION = "lowmem_eager"
_NORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


# ---------------------------------------------------------------------------------------- attention
def lowmem_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's ``eager_attention_forward`` (same ops, same rounding points in the forward pass).

    ``query`` ``[b, heads, t, d]``; ``key``/``value`` ``[b, kv_heads, s, d]``. Query head ``i`` uses
    key head ``i // groups`` exactly as ``repeat_kv`` arranges it.
    """
    b, h, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = h // hkv
    scores = torch.matmul(query.reshape(b, hkv, g * t, d), key.transpose(2, 3)).view(b, hkv, g, t, s)
    scores.mul_(scaling)  # in place: matmul's backward needs its inputs, not its output
    if attention_mask is not None:
        scores.add_(attention_mask[:, :, None, :, :s])
    probs = torch.softmax(scores, dim=-1)
    if dropout and module.training:
        probs = F.dropout(probs, dropout, True)
    out = torch.matmul(probs.view(b, hkv, g * t, s), value)
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make ``attn_implementation="lowmem_eager"`` known to transformers (with the eager float mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(LOWMEM_ATTENTION, lowmem_eager_attention)
    AttentionMaskInterface.register(LOWMEM_ATTENTION, eager_mask)
    return LOWMEM_ATTENTION


# ------------------------------------------------------------------------------------------ RMSNorm
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32, copy=True)  # our own buffer: the in-place ops below never touch x
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = x32.mul_(rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        y32 = x.to(torch.float32, copy=True).mul_(rstd)
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (grad * y32.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        gy = (grad * weight).float()
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (gy - y * mean(gy * y)), in place
        dot = (gy * y32).mean(-1, keepdim=True)
        gx = gy.sub_(y32.mul_(dot)).mul_(rstd)
        return gx.to(x.dtype), gw, None


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


# ------------------------------------------------------------------------------------------- SwiGLU
class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up`` keeping only ``gate`` and ``up`` for backward (same ops as autograd's)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return g_gate, g_up


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


# -------------------------------------------------------------------------------------- LoRA dropout
def _sparse_drop_mask(n: int, p: float, dtype: torch.dtype, draws: int | None = None) -> torch.Tensor:
    """A length-``n`` 0/1 keep-mask, each entry dropped independently with probability ``p`` (CPU).

    The dropped positions of a Bernoulli(p) sequence are separated by i.i.d. Geometric(p) gaps, so
    drawing the gaps takes about ``n * p`` random numbers instead of ``n``: a 5% LoRA dropout costs a
    third of the time of ``torch.rand`` (torch's CPU generator draws one number at a time).
    """
    keep = torch.ones(n, dtype=dtype)
    mean = n * p
    draws = draws or int(mean + 6 * math.sqrt(mean * (1 - p)) + 16)
    start = 0
    while True:
        gaps = torch.empty(draws, dtype=torch.float64).geometric_(p)  # trials up to and including a drop
        pos = gaps.cumsum_(0).add_(start - 1).long()
        inside = pos[pos < n]
        keep.index_fill_(0, inside, 0)
        if inside.numel() < draws:  # the sequence ran past the end: every position is decided
            return keep
        start = int(pos[-1]) + 1


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (inverted scaling, the same Bernoulli mask distribution), faster on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        # bf16/fp16: a 0/1 mask in x's dtype (2 bytes kept, not 1) makes the forward and backward
        # multiplies same-dtype, several times faster than with a bool mask; fp32 keeps a bool mask
        dtype = x.dtype if x.element_size() == 2 else torch.bool
        if x.device.type == "cpu" and self.p <= 0.25:
            keep = _sparse_drop_mask(x.numel(), self.p, dtype).view(x.shape)
        else:
            keep = (torch.rand(x.shape, device=x.device) >= self.p).to(dtype)
        return (x * keep).mul_(1.0 / (1.0 - self.p))


def apply_training_kernels(model: nn.Module, autocast: bool) -> list[str]:
    """Swap the kernels above into ``model`` in place; returns what was swapped (for the log)."""
    done: set[str] = set()
    for module in model.modules():
        name = type(module).__name__
        if name in _NORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            done.add("rmsnorm")
        elif (
            name in _MLP_CLASSES
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
            and getattr(getattr(module, "config", None), "hidden_act", "silu") == "silu"
        ):
            module.forward = types.MethodType(_swiglu_forward, module)
            done.add("swiglu")
        lora_dropout = getattr(module, "lora_dropout", None)
        if isinstance(lora_dropout, nn.ModuleDict):
            for key, drop in list(lora_dropout.items()):
                if type(drop) is nn.Dropout:
                    lora_dropout[key] = FastDropout(drop.p)
                    done.add("lora-dropout")
            if autocast and hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return sorted(done)
