"""The one place the training loss is computed.

Only positions whose label is trained go through ``lm_head``: prompt and padding positions never
produce full-vocabulary logits. The cross-entropy runs in chunks of ``chunk_size`` positions, so
at most ``chunk_size x vocab`` logits exist at any time.

For a plain ``nn.Linear`` head (every LLaMA-family model) the head and the cross-entropy are fused
(:class:`FusedLinearCrossEntropy`): each chunk's gradient is computed in the forward pass, while
its logits exist, so backward neither recomputes the logits nor keeps them. Other heads (a LoRA
or quantized ``lm_head``, sharded weights) take a chunked path with activation checkpointing.

The module returns the *sum* of token losses and the token count; the trainer divides by the
number of trained tokens of the whole accumulated (and all-reduced) batch, so gradient
accumulation and data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.tokenize import IGNORE


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The matmul dtype the head would use: autocast's when it is on, else the promoted dtype."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, w.dtype)


_WORKSPACE: dict[tuple, torch.Tensor] = {}


def _workspace(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, cols]`` scratch buffer kept between calls (CPU only).

    A chunk of fp32 logits is tens of MB: above glibc's mmap threshold, so a fresh tensor would be
    mapped (and page-faulted in) on every chunk, which costs more than the softmax itself. GPUs
    have torch's caching allocator and get plain tensors.
    """
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key = (name, cols, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _WORKSPACE[key] = torch.empty(rows, cols, dtype=dtype)
    return buf[:rows]


def _ce_chunks(hidden, weight, targets, chunk_size, dtype, grad_h=None, grad_w=None, row_of=None, n_rows=0) -> torch.Tensor:
    """Loss sum over chunks; fills ``grad_h`` (``d sum / d hidden``) and adds into ``grad_w`` if given.

    With ``row_of`` (the sequence index of each position) the sums are per sequence, ``[n_rows]``.
    """
    w = weight.to(dtype)
    n, vocab = hidden.shape[0], w.shape[0]
    rows = min(chunk_size, n)
    fp32 = dtype == torch.float32  # then the logits buffer is the fp32 softmax buffer too
    logits_buf = _workspace("logits", rows, vocab, dtype, hidden.device)
    z_buf = logits_buf if fp32 else _workspace("z", rows, vocab, torch.float32, hidden.device)
    total = torch.zeros((n_rows,) if row_of is not None else (), dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(dtype)
            t = targets[start:end, None]
            logits = torch.mm(h, w.t(), out=logits_buf[: end - start])
            target_logit = logits.gather(1, t).float()
            # softmax in place in one fp32 buffer
            z = logits if fp32 else z_buf[: end - start].copy_(logits)
            zmax = z.amax(-1, keepdim=True)
            probs = z.sub_(zmax).exp_()
            norm = probs.sum(-1, keepdim=True)
            per_pos = norm.log() + zmax - target_logit  # logsumexp - target logit
            if row_of is None:
                total += per_pos.sum()
            else:
                total.index_add_(0, row_of[start:end], per_pos[:, 0])
            if grad_h is None and grad_w is None:
                continue
            # d(sum CE)/d(logits) = softmax - onehot
            probs.div_(norm).scatter_add_(1, t, probs.new_full(t.shape, -1.0))
            g = probs if fp32 else logits.copy_(probs)  # back to the compute dtype
            if grad_h is not None:
                if grad_h.dtype == dtype:
                    torch.mm(g, w, out=grad_h[start:end])
                else:
                    grad_h[start:end] = torch.mm(g, w)
            if grad_w is not None:
                grad_w.add_(torch.mm(g.t(), h))
    return total


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T, targets_i)``, its gradients computed chunk by chunk in forward.

    Written by hand: torch has no fused linear + cross-entropy, and the known ones (Liger, Apple's
    cut-cross-entropy) are Triton/CUDA kernels. Per chunk: logits in the compute dtype, softmax and
    loss in fp32, ``dlogits = softmax - onehot`` in place, then ``dh = dlogits @ W`` and (if W is
    trained) ``dW += dlogits.T @ h``. Numerically what ``F.cross_entropy(head(h).float())`` gives
    under the same precision, without the backward recomputation of the logits or the
    full-vocabulary gradient buffers of ``cross_entropy``'s backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, dtype: torch.dtype, row_of=None, n_rows: int = 0):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_w and row_of is not None:
            raise ValueError("per-sequence sums with a trained head take the unfused path")
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = _ce_chunks(hidden, weight, targets, chunk_size, dtype, grad_h, grad_w, row_of, n_rows)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w, row_of)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, row_of = ctx.saved_tensors
        if row_of is not None:  # per-sequence sums: each position takes its sequence's upstream gradient
            gh = grad_h * grad_out[row_of].to(grad_h.dtype)[:, None] if grad_h is not None else None
            return gh, None, None, None, None, None, None
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Sum of the cross-entropy of ``hidden @ weight.T`` (``[n, d] x [vocab, d]``) against ``targets`` ``[n]``."""
    dtype = _compute_dtype(hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, dtype)
    with torch.no_grad():
        return _ce_chunks(hidden, weight, targets, chunk_size, dtype)


def _fusable(head: nn.Module, hidden: torch.Tensor) -> bool:
    """A plain, unsharded ``nn.Linear`` without bias whose full weight is present in this process."""
    w = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and head.bias is None
        and w is not None
        and w.dim() == 2
        and w.shape[1] == hidden.shape[-1]
        and not hasattr(w, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter
    )


def _ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over trained positions, and their count.

    Args:
        hidden: final hidden states ``[batch, seq, dim]``.
        labels: ``[batch, seq]`` token ids, ``-100`` where not trained (unshifted, as in HF).
        head: the output projection (``lm_head``).
        chunk_size: trained positions per chunk.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    t = targets[keep]
    n = t.numel()
    if n == 0:
        return hidden.sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    if _fusable(head, h):
        return fused_linear_cross_entropy(h, head.weight, t, chunk_size), torch.tensor(n, device=hidden.device)
    if n <= chunk_size:
        return _ce_sum(head, h, t), torch.tensor(n, device=hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        total = total + checkpoint(_ce_sum, head, hc, tc, use_reentrant=False)
    return total, torch.tensor(n, device=hidden.device)


def _ce_per_pos(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def sequence_logprobs(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of log p(label) over trained positions ``[batch]`` (fp32), and their count.

    What preference losses need (DPO compares whole-reply log-probabilities). Same paths as
    :func:`chunked_cross_entropy`: fused for a frozen plain ``nn.Linear`` head, else chunked with
    activation checkpointing.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    counts = keep.sum(1)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    h = hidden[:, :-1][keep]
    t = targets[keep]
    n_rows = labels.shape[0]
    if t.numel() == 0:
        return hidden.sum() * 0.0 + hidden.new_zeros(n_rows, dtype=torch.float32), counts
    w = getattr(head, "weight", None)
    if _fusable(head, h) and not w.requires_grad:
        dtype = _compute_dtype(h, w)
        if torch.is_grad_enabled() and h.requires_grad:
            return -FusedLinearCrossEntropy.apply(h, w, t, chunk_size, dtype, rows, n_rows), counts
        with torch.no_grad():
            return -_ce_chunks(h, w, t, chunk_size, dtype, row_of=rows, n_rows=n_rows), counts
    total = hidden.new_zeros(n_rows, dtype=torch.float32)
    for start in range(0, t.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        ce = checkpoint(_ce_per_pos, head, h[sl], t[sl], use_reentrant=False) if torch.is_grad_enabled() else _ce_per_pos(head, h[sl], t[sl])
        total = total.index_add(0, rows[sl], -ce)
    return total, counts


def token_logprobs(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: log p(label) ``[batch, seq - 1]`` (fp32, 0 where not trained), and the trained mask.

    What GRPO needs (a ratio per token). The same paths as :func:`sequence_logprobs`, each trained
    position counted as its own "sequence" of the fused kernel.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    t = targets[keep]
    n = t.numel()
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    if n == 0:
        return out + hidden.sum() * 0.0, keep
    w = getattr(head, "weight", None)
    pos = torch.arange(n, device=hidden.device)
    if _fusable(head, h) and not w.requires_grad:
        dtype = _compute_dtype(h, w)
        if torch.is_grad_enabled() and h.requires_grad:
            lp = -FusedLinearCrossEntropy.apply(h, w, t, chunk_size, dtype, pos, n)
        else:
            with torch.no_grad():
                lp = -_ce_chunks(h, w, t, chunk_size, dtype, row_of=pos, n_rows=n)
    else:
        parts = []
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            ce = checkpoint(_ce_per_pos, head, h[sl], t[sl], use_reentrant=False) if torch.is_grad_enabled() else _ce_per_pos(head, h[sl], t[sl])
            parts.append(-ce)
        lp = torch.cat(parts)
    return out.masked_scatter(keep, lp), keep


class CausalLMLoss(nn.Module):
    """Wraps a (PEFT) causal LM so that ``forward(batch)`` returns ``(loss_sum, n_trained)``.

    Wrapping (rather than calling sub-modules from the trainer) keeps DDP/FSDP correct: the
    engine sees one module whose forward produces the loss.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        per_sequence: bool = False,
        per_token: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, n_trained)``; with ``per_sequence``: ``(logp_sum [batch], n_trained [batch])``; with
        ``per_token``: ``(logp [batch, seq-1], trained mask [batch, seq-1])``."""
        base = self._base()
        cfg = base.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            # Models that post-process logits: take the full logits from the model itself.
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            t = labels[:, 1:]
            ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), t, reduction="none")
            if per_token:
                return -ce, t != IGNORE
            if per_sequence:
                return -ce.sum(1), (t != IGNORE).sum(1)
            return ce.sum(), (t != IGNORE).sum()
        out = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        if per_token:
            return token_logprobs(out[0], labels, base.get_output_embeddings(), self.chunk_size)
        if per_sequence:
            return sequence_logprobs(out[0], labels, base.get_output_embeddings(), self.chunk_size)
        return chunked_cross_entropy(out[0], labels, base.get_output_embeddings(), self.chunk_size)
