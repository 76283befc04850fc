"""Preference tuning in our trainer: losses equal TRL's formulas, the reference is the adapter-disabled
model, DPO learns the preference on held-out pairs, every stage resumes exactly and runs under DDP."""

import csv
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES, free_port, run_cli, run_flags, write_jsonl
from safetensors.torch import load_file

from chinese_vicuna.config import ConfigError, load_config
from chinese_vicuna.data.tokenize import IGNORE
from chinese_vicuna.train.preference import PrefHparams, kto_losses, pair_losses
from chinese_vicuna.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["dpo", "ipo", "orpo", "simpo", "kto"]


# ----------------------------------------------------------------------------- formulas
def _vals(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1, -torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1
    rc, rr = pc + torch.randn(n, generator=g, dtype=torch.float64), pr + torch.randn(n, generator=g, dtype=torch.float64)
    nc, nr = torch.randint(3, 30, (n,), generator=g), torch.randint(3, 30, (n,), generator=g)
    return pc, pr, rc, rr, nc, nr


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_losses_match_the_published_formulas(loss_type, ls):
    pc, pr, rc, rr, nc, nr = _vals()
    b = 0.3
    hp = PrefHparams("dpo", beta=b, loss_type=loss_type, label_smoothing=ls)
    losses, cr, rjr = pair_losses(hp, pc, pr, nc, nr, rc, rr)
    for i in range(len(pc)):
        x = (pc[i] - rc[i] - (pr[i] - rr[i])).item()
        want = {
            "sigmoid": -(1 - ls) * logsig(b * x) - ls * logsig(-b * x),  # DPO; cDPO with label smoothing
            "hinge": max(0.0, 1 - b * x),
            "robust": (-(1 - ls) * logsig(b * x) + ls * logsig(-b * x)) / (1 - 2 * ls),
        }[loss_type]
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert cr[i].item() == pytest.approx(b * (pc[i] - rc[i]).item()) and rjr[i].item() == pytest.approx(b * (pr[i] - rr[i]).item())


def test_ipo_loss_is_trls_length_normalised_form():
    pc, pr, rc, rr, nc, nr = _vals(1)
    b = 0.5
    losses, _, _ = pair_losses(PrefHparams("ipo", beta=b), pc, pr, nc, nr, rc, rr)
    for i in range(len(pc)):
        d = (pc[i] - rc[i]).item() / nc[i].item() - (pr[i] - rr[i]).item() / nr[i].item()
        assert losses[i].item() == pytest.approx((d - 1 / (2 * b)) ** 2, rel=1e-12)


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer, CPOTrainer


def test_orpo_equals_trl(trl):
    orpo, _ = trl
    pc, pr, _, _, nc, nr = _vals(2)
    pc, pr = pc / 10, pr / 10  # keep average log-probs in a realistic range
    b = 0.25
    ours, cr, rjr = pair_losses(PrefHparams("orpo", beta=b), pc, pr, nc, nr)
    ac, ar = pc / nc, pr / nr
    fake = types.SimpleNamespace(beta=b, accelerator=types.SimpleNamespace(device="cpu"))
    t_losses, t_cr, t_rr, _, _ = orpo.odds_ratio_loss(fake, ac, ar)
    # TRL: loss = nll(chosen) - mean(beta * log sigmoid(log_odds)); per pair, nll = -average log-prob
    torch.testing.assert_close(ours.float(), (-ac - t_losses).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cr.float(), t_cr.float()) and torch.testing.assert_close(rjr.float(), t_rr.float())


@pytest.mark.parametrize("ls", [0.0, 0.15])
def test_simpo_equals_trl(trl, ls):
    _, cpo = trl
    pc, pr, _, _, nc, nr = _vals(3)
    b, gamma = 2.0, 0.7
    ours, cr, rjr = pair_losses(PrefHparams("simpo", beta=b, simpo_gamma=gamma, label_smoothing=ls), pc, pr, nc, nr)
    fake = types.SimpleNamespace(beta=b, simpo_gamma=gamma, label_smoothing=ls, alpha=0.0, loss_type="simpo",
                                 accelerator=types.SimpleNamespace(device="cpu"))
    t_losses, t_cr, t_rr = cpo.cpo_loss(fake, pc / nc, pr / nr)
    torch.testing.assert_close(ours, t_losses)
    torch.testing.assert_close(cr, t_cr) and torch.testing.assert_close(rjr, t_rr)


def test_kto_loss_matches_the_published_formula():
    pc, _, rc, _, nc, _ = _vals(4)
    desirable = torch.tensor([True, False, True, True, False, False])
    b, kl, wd, wu = 0.2, torch.tensor(0.37, dtype=torch.float64), 1.3, 0.8
    hp = PrefHparams("kto", beta=b, desirable_weight=wd, undesirable_weight=wu)
    losses, rewards = kto_losses(hp, pc, rc, nc, desirable, kl)
    for i in range(len(pc)):
        r = (pc[i] - rc[i]).item()
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        want = wd * (1 - sig(b * (r - kl.item()))) if desirable[i] else wu * (1 - sig(b * (kl.item() - r)))
        assert losses[i].item() == pytest.approx(want, rel=1e-12)
        assert rewards[i].item() == pytest.approx(b * r)


def test_pref_ftx_adds_the_chosen_nll():
    pc, pr, rc, rr, nc, nr = _vals(5)
    base, _, _ = pair_losses(PrefHparams("dpo"), pc, pr, nc, nr, rc, rr)
    ftx, _, _ = pair_losses(PrefHparams("dpo", ftx=0.5), pc, pr, nc, nr, rc, rr)
    torch.testing.assert_close(ftx - base, 0.5 * (-pc / nc))


# ----------------------------------------------------------------------------- training
def pairs(n, start=0):
    return [
        {"instruction": f"第{i}个问题：今天过得怎么样？", "input": "",
         "chosen": f"谢谢关心，我今天过得很好，第{i}次回答。", "rejected": f"关你什么事，走开！{i}"}
        for i in range(start, start + n)
    ]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pairs(16))


def overrides(base, data, out, **kw):
    return run_flags(base, data, out, **{"cutoff_len": 96, **kw})


def metrics(out):
    with open(Path(out) / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def plain_logps(model, sample):
    """log p(reply) from a plain HF forward: log_softmax of the full logits, summed over trained tokens."""
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    labels = torch.tensor(sample.labels[1:])
    keep = labels != IGNORE
    return logits.log_softmax(-1)[keep].gather(1, labels[keep, None]).sum().item()


def test_reference_is_the_adapter_disabled_model(tiny_model_dir, pairs_file, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, pairs_file, tmp_path / "run", stage="dpo", max_steps=3,
                                      lora_target_modules="all-linear", learning_rate=2e-2))
    trainer = run_training(cfg, progress_bar=False)
    obj = trainer.objective
    model = trainer.accelerator.unwrap_model(trainer.wrapper).model
    seen = [s for s in trainer.data.train if hasattr(s, "ref")]
    assert len(seen) == 12  # 3 steps x 4 pairs: computed when first needed, once
    rows = [r for s in seen for r in (s.chosen, s.rejected)]
    stored = torch.tensor([x for s in seen for x in s.ref])
    # the same computation, micro-batch by micro-batch as the loop collated them: bit for bit
    for mb in trainer._epoch_plan(0)[:6]:
        pairs_ = [trainer.data.train[i] for i in mb]
        with model.disable_adapter():
            again = obj._logps([r for p in pairs_ for r in (p.chosen, p.rejected)])
        assert torch.equal(again, torch.tensor([x for p in pairs_ for x in p.ref]))
    trained = obj._logps(rows)
    assert (trained - stored).abs().max() > 1e-3  # the adapter did move the policy away from it
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    for k in (0, 5, 11):
        assert stored[k].item() == pytest.approx(plain_logps(base, rows[k]), abs=2e-4)


def test_dpo_raises_the_margin_on_held_out_pairs(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pairs(40))
    cfg = load_config(None, overrides(tiny_model_dir, data, tmp_path / "run", stage="dpo", max_steps=12, val_size=8,
                                      eval_steps=12, lora_target_modules="all-linear", lora_r=8, learning_rate=2e-2,
                                      pref_beta=0.5))
    from chinese_vicuna.train.trainer import Trainer

    trainer = Trainer(cfg, progress_bar=False).setup()
    before = trainer.objective.evaluate()
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and before["val_rewards/margins"] == 0
    trainer.train()
    after = trainer.last_eval
    assert after["val_rewards/margins"] > 1.0, after
    assert after["val_rewards/accuracies"] == 1.0 and after["val_loss"] < 0.4, after
    rows = metrics(tmp_path / "run")
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in rows[-1]


class Interrupt(Exception):
    pass


def _interrupt_at(step):
    def cb(trainer, done, metrics):
        if done == step:
            raise Interrupt
    return cb


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_resumes_exactly(stage, tiny_model_dir, pairs_file, tmp_path):
    common = dict(stage=stage, max_steps=4, save_steps=2, val_size=4, eval_steps=2, lora_target_modules="q_proj,v_proj,gate_proj")
    ref = run_training(load_config(None, overrides(tiny_model_dir, pairs_file, tmp_path / "ref", **common)), progress_bar=False)
    out = tmp_path / "cut"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupt):
        run_training(load_config(None, overrides(tiny_model_dir, pairs_file, out, **common)), [_interrupt_at(3)], progress_bar=False)
    assert signal.getsignal(signal.SIGTERM) is handler  # the trainer's stop handlers are gone with it
    resumed = run_training(load_config(None, overrides(tiny_model_dir, pairs_file, out, resume="auto", **common)), progress_bar=False)
    assert resumed.resumed_from.name == "checkpoint-2"
    a, b = metrics(tmp_path / "ref"), metrics(out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "rewards/chosen", "logps/rejected"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), (key, x, y)
    assert a[0]["loss"] != a[-1]["loss"]
    wa, wb = load_file(str(tmp_path / "ref" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)
    assert ref.history[-1]["val_loss"] == pytest.approx(resumed.history[-1]["val_loss"], abs=1e-5)


@pytest.mark.parametrize("stage", [pytest.param(s, marks=[] if s == "kto" else pytest.mark.slow) for s in STAGES])
def test_ddp_two_processes_match_one(stage, tiny_model_dir, pairs_file, tmp_path):
    """Real DDP on CPU (gloo): the same global batch gives the same losses, rewards and adapter."""
    common = dict(stage=stage, max_steps=2, lora_dropout=0.0, micro_batch_size=1, batch_size=4)
    run_training(load_config(None, overrides(tiny_model_dir, pairs_file, tmp_path / "one", **common)), progress_bar=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "chinese_vicuna", "train", *overrides(tiny_model_dir, pairs_file, tmp_path / "two", **common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for x, y in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert x[key] == pytest.approx(y[key], abs=1e-4), (key, x, y)
    wa, wb = load_file(str(tmp_path / "one" / "adapter_model.safetensors")), load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", [pytest.param(s, marks=[] if s == "dpo" else pytest.mark.slow) for s in ("dpo", "orpo", "simpo", "kto")])
def test_cli_trains_and_saves_a_plain_peft_adapter(stage, tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    run_cli("train", *overrides(tiny_model_dir, pairs_file, out, stage=stage, max_steps=2))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert "stage: " + stage in (out / "run_config.yaml").read_text()


def test_cli_bad_preference_data_is_a_clean_error(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", pairs(2) + [{"instruction": "问", "chosen": "答"}])
    proc = run_cli("train", *overrides(tiny_model_dir, bad, tmp_path / "run", stage="dpo", max_steps=1), check=False)
    assert proc.returncode != 0
    assert f"{bad}:3: rejected: expected a string or a list with one assistant message" in proc.stderr
    assert "Traceback" not in proc.stderr
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "问", "input": "", "output": "答"}])
    proc = run_cli("train", *overrides(tiny_model_dir, sft, tmp_path / "run2", stage="orpo", max_steps=1), check=False)
    assert f"{sft}:1: chosen: expected a string" in proc.stderr and "Traceback" not in proc.stderr


def test_config_checks():
    with pytest.raises(ConfigError, match="packing: not supported with stage dpo"):
        load_config(None, ["--stage", "dpo", "--packing", "true"])
    with pytest.raises(ConfigError, match="ref_adapter: only dpo, ipo and kto"):
        load_config(None, ["--stage", "orpo", "--ref_adapter", "x"])
    with pytest.raises(ConfigError, match="stage: expected one of"):
        load_config(None, ["--stage", "ppo"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto"])
def test_demo_config_with_the_bundled_pairs(stage, tmp_path):
    """docs/preference.md's command on the embedded model: `train configs/demo.yaml --stage S --data_path PAIRS`."""
    out = tmp_path / stage
    proc = run_cli("train", str(ROOT / "configs" / "demo.yaml"), "--stage", stage, "--data_path",
                   str(SAMPLES / "preference.jsonl"), "--max_steps", "2", "--output_dir", str(out), "--val_size", "0",
                   "--report_to", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    rows = metrics(out)
    assert len(rows) == 2 and "rewards/chosen" in rows[0]


def test_ref_adapter_is_the_reference_and_leaves_the_trained_adapter_alone(tiny_model_dir, tiny_adapter_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, overrides(tiny_model_dir, pairs_file, tmp_path / "run", stage="dpo", max_steps=2,
                                      ref_adapter=tiny_adapter_dir, lora_target_modules="q_proj,v_proj"))
    trainer = run_training(cfg, progress_bar=False)
    model = trainer.accelerator.unwrap_model(trainer.wrapper).model
    assert list(model.peft_config) == ["default"]  # the reference adapter was only borrowed
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".default." in n and ("lora_A" in n or "lora_B" in n) for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tiny_adapter_dir)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    s = trainer.data.train[0]
    assert s.ref[0] == pytest.approx(plain_logps(ref_model, s.chosen), abs=2e-4)
    assert abs(s.ref[0] - plain_logps(base, s.chosen)) > 1e-2  # and it is not the bare base


def test_pissa_reference_is_the_original_model(tiny_model_dir, pairs_file, tmp_path):
    """PiSSA subtracts the adapter's start from the base: the reference must still be the original model."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, overrides(tiny_model_dir, pairs_file, tmp_path / "run", stage="dpo", max_steps=1,
                                      lora_init="pissa", lora_target_modules="q_proj,v_proj", lora_dropout=0.0))
    trainer = run_training(cfg, progress_bar=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for s in trainer.data.train[:3]:
        assert s.ref[0] == pytest.approx(plain_logps(base, s.chosen), abs=5e-4)
        assert s.ref[1] == pytest.approx(plain_logps(base, s.rejected), abs=5e-4)
    # policy == reference at the start (no dropout: PiSSA's adapter is not zero at initialisation)
    assert trainer.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    with pytest.raises(ConfigError, match="ref_adapter: cannot be loaded onto the residual base"):
        load_config(None, ["--stage", "dpo", "--lora_init", "pissa", "--ref_adapter", "x"])


def test_stage_pretrain_is_the_raw_text_path(tiny_model_dir, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"第{i}段：春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 3 for i in range(12)), encoding="utf-8")
    trainer = run_training(load_config(None, overrides(tiny_model_dir, text, tmp_path / "pt", stage="pretrain", max_steps=2,
                                                       cutoff_len=32)), progress_bar=False)
    s = trainer.data.train[0]
    assert len(s.input_ids) == 32 and s.labels == s.input_ids  # full blocks, every token trained
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "问", "input": "", "output": "答"}])
    from chinese_vicuna.data.datasets import DataError

    with pytest.raises(DataError, match=r"sft.jsonl:1: text: missing; expected a string"):
        run_training(load_config(None, overrides(tiny_model_dir, sft, tmp_path / "pt2", stage="pretrain", max_steps=1)),
                     progress_bar=False)
