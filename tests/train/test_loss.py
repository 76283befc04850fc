import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chinese_vicuna.data.collate import collate
from chinese_vicuna.data.tokenize import IGNORE, Sample
from chinese_vicuna.train.loss import CausalLMLoss, fused_linear_cross_entropy


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


def _reference(h, w, t, dtype=None):
    logits = (h.to(dtype) @ w.to(dtype).t()) if dtype else h @ w.t()
    return F.cross_entropy(logits.float(), t, reduction="sum")


@pytest.mark.parametrize("train_w", [False, True])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_fused_linear_cross_entropy_matches_cross_entropy(train_w, chunk):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(23, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=train_w)
    t = torch.randint(0, 50, (23,), generator=g)
    ref = _reference(h, w, t)
    gh_ref, *gw_ref = torch.autograd.grad(ref * 0.37, [h, w] if train_w else [h])
    out = fused_linear_cross_entropy(h, w, t, chunk)
    gh, *gw = torch.autograd.grad(out * 0.37, [h, w] if train_w else [h])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-6)
    if train_w:
        torch.testing.assert_close(gw[0], gw_ref[0], rtol=1e-5, atol=1e-6)
    # evaluation (no grad) computes only the loss, and the same value
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, t, chunk), ref.detach(), rtol=1e-6, atol=1e-5)


def test_fused_cross_entropy_under_bf16_autocast_equals_autocast_head():
    """Under autocast the fused path rounds exactly where ``F.cross_entropy(lm_head(h).float())`` does."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(40, 32, generator=g, dtype=torch.bfloat16, requires_grad=True)
    head = nn.Linear(32, 300, bias=False).to(torch.bfloat16).requires_grad_(False)
    t = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(head(h).float(), t, reduction="sum")
        out = fused_linear_cross_entropy(h, head.weight, t, 16)
    (gh_ref,) = torch.autograd.grad(ref, [h])
    (gh,) = torch.autograd.grad(out, [h])
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    # bf16 gradients: same rounding points, summation order of the fp32 softmax may differ in the last bit
    torch.testing.assert_close(gh.float(), gh_ref.float(), rtol=2e-2, atol=1e-4)


def test_plain_linear_head_takes_the_fused_path_and_others_do_not(tiny_model):
    from chinese_vicuna.train import loss as loss_mod

    h = torch.zeros(3, tiny_model.config.hidden_size)
    assert loss_mod._fusable(tiny_model.lm_head, h)
    assert not loss_mod._fusable(nn.Linear(tiny_model.config.hidden_size, 10, bias=True), h)

    class Wrapped(nn.Linear):
        pass

    assert not loss_mod._fusable(Wrapped(tiny_model.config.hidden_size, 10, bias=False), h)


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("chunk", [1024, 3])
def test_per_sequence_logprobs_and_their_gradients(tiny_model, train_head, chunk):
    """Preference losses need log p(reply) per sequence: fused (frozen head) and unfused (trained head) paths."""
    b = batch(seed=4, n=4)
    tiny_model.double()  # float64 model: what is left is the fused path's fp32 softmax
    tiny_model.requires_grad_(True)
    tiny_model.lm_head.weight.requires_grad_(train_head)
    weights = torch.tensor([0.7, -1.3, 2.0, 0.4], dtype=torch.float64)  # an arbitrary upstream gradient per sequence

    logits = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    t = b["labels"][:, 1:]
    keep = t != IGNORE
    per_tok = logits.log_softmax(-1).gather(2, t.clamp(min=0)[..., None])[..., 0] * keep
    want = per_tok.sum(1)
    (want * weights).sum().backward()
    ref = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()

    got, n = CausalLMLoss(tiny_model, chunk_size=chunk)(**b, per_sequence=True)
    assert n.tolist() == keep.sum(1).tolist()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # the sums are kept in fp32
    (got.double() * weights).sum().backward()
    assert ("lm_head.weight" in ref) == train_head
    for name, g in ref.items():
        err = (dict(tiny_model.named_parameters())[name].grad - g).norm() / g.norm()
        assert err < 1e-6, (name, float(err))
