import torch

from chinese_vicuna.data.collate import collate
from chinese_vicuna.data.tokenize import IGNORE, Sample
from chinese_vicuna.train.loss import CausalLMLoss


def batch(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 400, (7 + 4 * i,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * 4 + ids[4:]))
    return collate(out, pad_id=0)


def test_loss_equals_hf_loss_and_chunking_is_exact(tiny_model):
    b = batch()
    hf = tiny_model(**b).loss  # HF: mean over trained tokens
    for chunk in (1024, 3):
        tiny_model.zero_grad()
        loss_sum, n = CausalLMLoss(tiny_model, chunk_size=chunk)(**b)
        torch.testing.assert_close(loss_sum / n, hf, rtol=1e-5, atol=1e-6)
        (loss_sum / n).backward()
        grads = [p.grad.clone() for p in tiny_model.parameters()]
        if chunk == 1024:
            ref = grads
    for a, c in zip(ref, grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)  # fp32 summation order differs by chunk


def test_no_trained_tokens_gives_zero_with_graph(tiny_model):
    s = Sample([5, 6, 7], [IGNORE] * 3)
    loss, n = CausalLMLoss(tiny_model)(**collate([s], 0))
    assert n.item() == 0 and loss.item() == 0.0 and loss.requires_grad
