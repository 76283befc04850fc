"""The training stages: one registry that the config, the data readers and the trainer all ask.

A stage says what its records are (replies given prompts, raw text, chosen/rejected pairs, labelled
replies, prompts alone), whether it compares a policy with a reference model, and which objective trains it.
Nothing here imports torch: the config validates against it and ``--help`` lists it instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Stage:
    name: str
    objective: Literal["sft", "preference", "grpo"]
    """Which trainer objective runs it: next-token cross-entropy, a preference loss, or online RL (GRPO)."""
    records: Literal["conversations", "text", "pairs", "labelled", "prompts"]
    """What a training record is: prompt + reply, raw text, chosen/rejected pair, a reply labelled
    desirable/undesirable (KTO; pairs are split into one of each), or a prompt whose replies the policy samples."""
    needs_reference: bool = False
    """Whether the loss compares the policy with a reference model (the base with the adapter disabled,
    or ``ref_adapter``)."""

    @property
    def preference(self) -> bool:
        return self.objective == "preference"

    @property
    def packable(self) -> bool:
        """Packing several samples into one row: only where a sample is not compared as a whole sequence."""
        return self.objective == "sft"

    @property
    def data_format(self) -> str | None:
        """The record format the stage forces (``text`` for pre-training), else None (the config's ``format``)."""
        return "text" if self.records == "text" else None


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("sft", "sft", "conversations"),
        Stage("pretrain", "sft", "text"),
        Stage("dpo", "preference", "pairs", needs_reference=True),
        Stage("ipo", "preference", "pairs", needs_reference=True),
        Stage("orpo", "preference", "pairs"),
        Stage("simpo", "preference", "pairs"),
        Stage("kto", "preference", "labelled", needs_reference=True),
        # the KL reference of grpo (beta > 0) is always the base with the adapter disabled
        Stage("grpo", "grpo", "prompts"),
    )
}

StageName = Literal["sft", "pretrain", "dpo", "ipo", "orpo", "simpo", "kto", "grpo"]


def get_stage(name: str) -> Stage:
    """The stage called ``name``; a ValueError naming the known stages otherwise."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {name!r}") from None
