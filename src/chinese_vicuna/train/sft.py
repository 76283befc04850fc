"""The objective of the ``sft`` and ``pretrain`` stages: next-token cross-entropy over the trained tokens."""

from __future__ import annotations

import torch

from ..data.collate import collate, collate_packed
from ..data.tokenize import IGNORE, Sample


class SFTObjective:
    """Next-token cross-entropy over the trained tokens (``sft`` and ``pretrain``); the unit is a token.

    The trainer asks its objective for everything stage-specific: sample lengths, collation, the
    step's unit count, the micro-batch loss sum, extra metrics and validation (see
    :class:`.preference.PreferenceObjective` for the preference stages).
    """

    log_fields: tuple[str, ...] = ()

    def __init__(self, trainer):  # the Trainer that runs this stage
        self.trainer = trainer

    @staticmethod
    def length(s: Sample) -> int:
        return len(s.input_ids)

    def collate(self, samples: list[Sample], pad_id: int, device) -> dict[str, torch.Tensor]:
        batch = collate_packed(samples, pad_id) if self.trainer.cfg.data.packing else collate(samples, pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    @staticmethod
    def count(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    trained_tokens = count

    def prepare(self) -> None:
        pass

    def begin_step(self, batches: list[dict]) -> None:
        pass

    def loss(self, wrapper, batch: dict) -> torch.Tensor:
        return wrapper(**batch)[0]

    def pop_metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self) -> dict[str, float]:
        return {"val_loss": self.trainer.evaluate_tokens()}
