"""The one place the training loss is computed.

Only positions whose label is trained go through ``lm_head``: prompt and padding positions never
produce full-vocabulary logits. The cross-entropy runs in chunks, each recomputed in backward
(activation checkpointing), so at most ``chunk_size x vocab`` logits exist at any time.

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
    if n <= chunk_size:
        return _ce_sum(head, h, t), torch.tensor(n, device=hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        hc, tc = h[start : start + chunk_size], t[start : start + chunk_size]
        total = total + checkpoint(_ce_sum, head, hc, tc, use_reentrant=False)
    return total, torch.tensor(n, device=hidden.device)


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        base = self._base()
        cfg = base.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            # Models that post-process logits: take the full logits from the model itself.
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            t = labels[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), t.flatten(), reduction="sum")
            return loss, (t != IGNORE).sum()
        out = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return chunked_cross_entropy(out[0], labels, base.get_output_embeddings(), self.chunk_size)
