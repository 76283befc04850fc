"""Batch planning and collation: dynamic padding, length grouping, packing.

The batch plan is a pure function of (lengths, seed, epoch), so a resumed run rebuilds exactly
the same micro-batches and skips the ones already trained.

Packing puts several samples in one row with ``position_ids`` restarting at 0 for each sample
and no attention mask: transformers then builds a block-diagonal causal mask, so no token
attends across samples and the per-token loss equals the unpacked loss.
"""

from __future__ import annotations

import random

import torch

from .tokenize import IGNORE, Sample


def plan_batches(
    lengths: list[int], micro_batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Shuffled micro-batches of sample indices; similar lengths share a batch when grouping.

    Grouping follows the usual "megabatch" recipe: shuffle, cut into chunks of 64 micro-batches,
    sort each chunk by length, split into micro-batches, shuffle the micro-batch order.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = micro_batch_size * 64
        order = [
            i
            for start in range(0, len(order), mega)
            for i in sorted(order[start : start + mega], key=lambda j: -lengths[j])
        ]
    batches = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def plan_packed(lengths: list[int], capacity: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled samples packed first-fit-decreasing into rows of at most ``capacity`` tokens."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(order, key=lambda j: -lengths[j]):
        n = min(lengths[i], capacity)
        for b, free in enumerate(room):
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    rng.shuffle(bins)
    return bins


def collate(samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample of the batch (not to the cutoff)."""
    width = max(len(s.input_ids) for s in samples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n] = torch.tensor(s.input_ids)
        labels[r, :n] = torch.tensor(s.labels)
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """One row holding every sample, each with its own position ids (no cross-sample attention)."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for s in samples:
        ids += s.input_ids
        # The first label of each sample must not be predicted from the previous sample's last token.
        labels += [IGNORE] + s.labels[1:]
        pos += list(range(len(s.input_ids)))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
    }
