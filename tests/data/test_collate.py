import pytest
import torch

from chinese_vicuna.data.collate import collate, collate_packed, plan_batches, plan_packed
from chinese_vicuna.data.tokenize import IGNORE, Sample
from chinese_vicuna.train.loss import CausalLMLoss


def samples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 5 + 3 * i
        ids = torch.randint(3, 500, (L,), generator=g).tolist()
        labels = [IGNORE] * (L // 2) + ids[L // 2 :]
        out.append(Sample(ids, labels))
    return out


def test_plans_are_deterministic_and_cover_everything():
    lengths = [5, 50, 7, 30, 9, 12, 80, 3, 44, 21]
    a = plan_batches(lengths, 3, seed=1, epoch=0)
    assert a == plan_batches(lengths, 3, seed=1, epoch=0)
    assert a != plan_batches(lengths, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(10))
    p = plan_packed(lengths, 100, seed=1, epoch=0)
    assert sorted(i for b in p for i in b) == list(range(10))
    assert all(sum(lengths[i] for i in b) <= 100 for b in p)


def test_dynamic_padding_pads_to_longest_not_cutoff():
    b = collate(samples(3), pad_id=0)
    assert b["input_ids"].shape == (3, 11)
    assert b["attention_mask"].sum().item() == 5 + 8 + 11
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager", "lowmem_eager"])
def test_packed_loss_and_grads_equal_unpacked(tiny_model, attn):
    model = tiny_model
    if attn == "lowmem_eager":  # the trainer's default on CPU, with its other kernels
        from chinese_vicuna.train.kernels import apply_training_kernels, register_attention

        register_attention()
        apply_training_kernels(model, autocast=False)
    model.config._attn_implementation = attn
    w = CausalLMLoss(model)
    data = samples(5)

    def run(batch):
        model.zero_grad()
        loss, n = w(**batch)
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    l1, n1, g1 = run(collate(data, pad_id=0))
    l2, n2, g2 = run(collate_packed(data, pad_id=0))
    assert n1 == n2
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 summation order differs
