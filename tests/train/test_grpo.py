"""GRPO in our trainer: the losses equal TRL's GRPOTrainer, the `match` rule, prompt records, reward
errors, a learnable format reward, exact resume (inside a num_iterations rollout too) and DDP."""

import csv
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
from chinese_vicuna.data.formats import RecordError
from chinese_vicuna.data.grpo import to_prompt
from chinese_vicuna.train.grpo import GRPOHparams, group_advantages, sequence_losses, token_losses
from chinese_vicuna.train.rewards import RewardError, is_correct, load_rewards, score_group
from chinese_vicuna.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- TRL parity
def _trl_loss(loss_type, logp, old, adv, mask, ref, beta, eps_low, eps_high, max_len):
    """TRL's own ``GRPOTrainer._compute_loss`` on these per-token log-probs (one process, no accumulation)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    acc = types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction="sum": t, gather=lambda t: t)
    stub = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=acc,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": __import__("collections").defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    b, t = logp.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs)


def _trl_advantages(rewards, G, scale):
    """The advantages of TRL's ``_generate_and_score_completions`` (sum_then_normalize), with TRL's nanstd."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    adv = rewards - mean
    if scale:
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,iterations", [(0.0, 1), (0.04, 2)])
def test_loss_equals_trls_grpo_trainer(loss_type, beta, iterations):
    g = torch.Generator().manual_seed(3)
    G, n, T = 4, 12, 7
    rewards = torch.randint(0, 3, (n,), generator=g).float()
    rewards[4:8] = 1.0  # a zero-std group
    rewards[9] = float("nan")  # unscorable
    eps_low, eps_high = (0.2, 0.28) if loss_type == "dapo" else (0.2, 0.2)
    hp = GRPOHparams(num_generations=G, max_new_tokens=T, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
                     beta=beta, num_iterations=iterations)
    ours_adv, std_zero = group_advantages(rewards, G, scale=loss_type != "dr_grpo")
    torch.testing.assert_close(ours_adv, _trl_advantages(rewards, G, loss_type != "dr_grpo"))
    assert std_zero.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    base = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    old = base + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64) if iterations > 1 else None
    ref = base + 0.2 * torch.randn(n, T, generator=g, dtype=torch.float64) if beta else None
    logp_ours = base.clone().requires_grad_(True)
    logp_trl = base.clone().requires_grad_(True)
    per_token, _ = token_losses(hp, logp_ours, old if old is not None else logp_ours.detach(), ours_adv.double(), ref)
    units = mask.sum() if loss_type == "dapo" else n  # what GRPOObjective.count gives the trainer
    ours = sequence_losses(hp, per_token, mask).sum() / units
    trl = _trl_loss(loss_type, logp_trl, old, ours_adv.double(), mask, ref, beta, eps_low, eps_high, T)
    torch.testing.assert_close(ours, trl, rtol=1e-12, atol=1e-12)
    ours.backward()
    trl.backward()
    torch.testing.assert_close(logp_ours.grad, logp_trl.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("completion,gold,ok", [
    ("所以答案是１２。", 12, True),
    ("3+4=7，再加5得12", "12", True),
    ("最后结果：\\boxed{3/4}", "0.75", True),
    ("答案：一百零五个", 105, True),
    ("答案是三分之二", "2/3", True),
    ("答案：3.5万", "35000", True),
    ("一共是 1,000 元", "1000元", True),
    ("一共有十二个苹果", 12, True),
    ("答案是负五", -5, True),
    ("答案是12，不是13", 12, True),
    ("先有12个，又来了13个", 12, False),  # no marker: the last number is taken
    ("答案是 13", 12, False),
    ("答案：北京。", "北京", True),
    ("我猜是上海", "北京", False),
])  # fmt: skip
def test_match_rule(completion, gold, ok):
    assert is_correct(completion, gold) is ok


def test_builtin_rewards_and_their_names():
    funcs = load_rewards(["match", "format:^答", "length:2", "format:好$"], max_new_tokens=6)
    assert [f.name for f in funcs] == ["match", "format", "length", "format_2"]
    got = score_group(funcs, ["p"] * 3, ["答案是4", "答：好", "不知道"], [[1], [1, 2, 3, 4], [1] * 6], {"answer": ["4"] * 3}, "f:1")
    assert got[0] == [1.0, 0.0, 0.0] and got[1] == [1.0, 1.0, 0.0] and got[3] == [0.0, 1.0, 0.0]
    assert got[2] == [-0.0, -0.5, -1.0]
    nan = score_group(funcs[:1], ["p"], ["4"], [[1]], {}, "f:1")[0][0]
    assert nan != nan  # no answer field: None, left out of the statistics


def test_user_reward_errors_name_the_function_and_record(tmp_path):
    mod = tmp_path / "my_rewards.py"
    mod.write_text("def short(prompts, completions, **kw):\n    return [1.0]\n"
                   "def boom(prompts, completions, answer, **kw):\n    raise KeyError(answer[0])\n"
                   "def fine(prompts, completions, completion_ids, answer, **kw):\n    return [float(len(c)) for c in completions]\n")
    with pytest.raises(RewardError, match="cannot import no_such_module"):
        load_rewards(["no_such_module:f"], 8)
    with pytest.raises(RewardError, match="has no function 'nope'"):
        load_rewards([f"{mod}:nope"], 8)
    fine, short, boom = load_rewards([f"{mod}:fine", f"{mod}:short", f"{mod}:boom"], 8)
    assert score_group([fine], ["p", "p"], ["ab", "c"], [[1], [2]], {"answer": ["x", "x"]}, "d.jsonl:3") == [[2.0, 1.0]]
    with pytest.raises(RewardError, match=r"short returned 1 values for 2 completions \(record d.jsonl:3\)"):
        score_group([short], ["p", "p"], ["a", "b"], [[1], [2]], {}, "d.jsonl:3")
    with pytest.raises(RewardError, match=r"boom raised KeyError: 'x' \(record d.jsonl:4\)"):
        score_group([boom], ["p"], ["a"], [[1]], {"answer": ["x"]}, "d.jsonl:4")


# ----------------------------------------------------------------------------- records
def test_prompt_records_of_every_format():
    a = to_prompt({"instruction": "计算", "input": "1+1", "answer": "2"}, "f:1")
    assert a.reward_prompt == "计算\n1+1" and a.fields == {"instruction": "计算", "input": "1+1", "answer": "2"}
    o = to_prompt({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "answer": 3}, "f:2")
    assert o.reward_prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}] and o.fields["answer"] == 3
    s = to_prompt({"conversations": [{"from": "human", "value": "q"}], "key": "k"}, "f:3")
    assert [m.role for m in s.prompt] == ["user"] and s.conversational and s.fields == {"conversations": s.fields["conversations"], "key": "k"}
    t = to_prompt({"prompt": "问题", "answer": "4"}, "f:4")
    assert t.reward_prompt == "问题" and "prompt" not in t.fields and not t.conversational
    with pytest.raises(RecordError, match="f:5: messages: expected the prompt to end with a user message"):
        to_prompt({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "f:5")
    with pytest.raises(RecordError, match="f:6: record: expected a prompt"):
        to_prompt({"question": "q"}, "f:6")


def test_bundled_samples_and_demo_config():
    import json

    rows = [json.loads(x) for x in (SAMPLES / "grpo.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    assert 60 <= len(rows) <= 100
    for i, r in enumerate(rows, 1):
        rec = to_prompt(r, f"grpo.jsonl:{i}")
        assert "answer" in rec.fields
        assert is_correct(f"答案是{r['answer']}", r["answer"])  # each gold answer is readable by the match rule
    text = (ROOT / "configs" / "grpo-demo.yaml").read_text(encoding="utf-8")
    assert text.startswith("# chinese-vicuna train configs/grpo-demo.yaml")
    cfg = load_config(ROOT / "configs" / "grpo-demo.yaml")
    assert cfg.pref.stage == "grpo" and "match" in cfg.grpo.reward_funcs


def test_config_checks():
    with pytest.raises(ConfigError, match="packing: not supported with stage grpo"):
        load_config(None, ["--stage", "grpo", "--packing", "true"])
    with pytest.raises(ConfigError, match="reward_weights: expected 2 weights"):
        load_config(None, ["--stage", "grpo", "--reward_funcs", "match,length", "--reward_weights", "1"])
    with pytest.raises(ConfigError, match="num_generations: expected >= 2"):
        load_config(None, ["--stage", "grpo", "--num_generations", "1"])
    with pytest.raises(ConfigError, match="beta: .* needs finetuning: lora"):
        load_config(None, ["--stage", "grpo", "--beta", "0.1", "--finetuning", "full"])


# ----------------------------------------------------------------------------- training
def prompts(n, start=0):
    return [{"instruction": f"第{i}题：{i} 加 {i + 1} 等于多少？", "answer": str(2 * i + 1)} for i in range(start, start + n)]


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", prompts(16))


def overrides(base, data, out, **kw):
    return run_flags(base, data, out, **{"stage": "grpo", "cutoff_len": 96, "max_new_tokens": 4, "num_generations": 4,
                                         "reward_funcs": r"format:^\s,length:2", **kw})


def metrics(out):
    with open(Path(out) / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny model with its output head x3: a peaked first-token distribution that a tiny LoRA can move
    (the fixture's flat one spreads over 49k tokens, where no text pattern is a direction of the head)."""
    from helpers import make_tiny_llama

    d = tmp_path_factory.mktemp("tiny-sharp")
    model = make_tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_a_format_reward_is_learned(sharp_model_dir, prompts_file, tmp_path):
    """Rewarding completions that start with a non-space character: the mean format reward rises from about
    0.2 to about 1 in a dozen steps."""
    out = tmp_path / "run"
    cfg = load_config(None, overrides(sharp_model_dir, prompts_file, out, reward_funcs=r"format:^\S", max_new_tokens=1,
                                      num_generations=8, micro_batch_size=4, batch_size=4, max_steps=12,
                                      learning_rate=3e-2, lora_target_modules="all-linear", lora_dropout=0.0,
                                      lr_scheduler="constant"))
    run_training(cfg, progress_bar=False)
    rows = metrics(out)
    rewards = [r["rewards/format/mean"] for r in rows]
    assert rewards[0] < 0.5 and sum(rewards[-3:]) / 3 > 0.85, rewards
    for key in ("reward", "reward_std", "rewards/format/std", "completion_length", "frac_reward_zero_std", "clip_ratio/region_mean"):
        assert key in rows[-1]


class Interrupt(Exception):
    pass


def _interrupt_at(step):
    def cb(trainer, done, metrics):
        if done == step:
            raise Interrupt
    return cb


@pytest.mark.parametrize("kw", [dict(grpo_loss_type="dapo", beta=0.05), dict(num_iterations=2, grpo_loss_type="grpo")])
def test_resumes_exactly(kw, tiny_model_dir, prompts_file, tmp_path):
    """The sampling RNG and (num_iterations) the rollout being trained on come back with the checkpoint."""
    common = dict(max_steps=4, save_steps=1, val_size=4, eval_steps=2, lora_target_modules="q_proj,v_proj", learning_rate=2e-2, **kw)
    run_training(load_config(None, overrides(tiny_model_dir, prompts_file, tmp_path / "ref", **common)), progress_bar=False)
    out = tmp_path / "cut"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupt):
        run_training(load_config(None, overrides(tiny_model_dir, prompts_file, out, **common)), [_interrupt_at(3)], progress_bar=False)
    assert signal.getsignal(signal.SIGTERM) is handler
    resumed = run_training(load_config(None, overrides(tiny_model_dir, prompts_file, out, resume=str(out / "checkpoint-3"), **common)),
                           progress_bar=False)
    assert resumed.resumed_from.name == "checkpoint-3"
    a, b = metrics(tmp_path / "ref"), metrics(out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()  # with num_iterations, rewards are logged on the rollout steps only
        for key in ("loss", "reward", "completion_length", "clip_ratio/region_mean", "kl", "val_loss", "val_reward"):
            assert x.get(key) == pytest.approx(y.get(key), abs=1e-6), (key, x, y)
    assert "kl" in a[0] if "beta" in kw else "reward" not in a[1]
    assert a[1]["val_loss"] == -a[1]["val_reward"] and "val_rewards/format/mean" in a[3]
    wa, wb = load_file(str(tmp_path / "ref" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)


def test_cli_trains_and_saves_a_plain_peft_adapter(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    mod = tmp_path / "user_rewards.py"
    mod.write_text(LENGTH_OF, encoding="utf-8")
    run_cli("train", *overrides(tiny_model_dir, prompts_file, out, max_steps=1, reward_funcs=f"match,{mod}:length_of"))
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    row = metrics(out)[0]
    assert row["rewards/match/mean"] == 0.0 and row["rewards/length_of/mean"] == row["completion_length"]


LENGTH_OF = '''
def length_of(prompts, completions, completion_ids, answer, **kwargs):
    """A user reward function in TRL's signature."""
    assert len(answer) == len(completions) and isinstance(prompts[0], str)
    return [float(len(ids)) for ids in completion_ids]
'''


def test_cli_reward_error_is_one_line_and_leaves_no_adapter(tiny_model_dir, prompts_file, tmp_path):
    mod = tmp_path / "bad.py"
    mod.write_text("def wrong(prompts, completions, **kw):\n    return [0.0]\n")
    out = tmp_path / "run"
    proc = run_cli("train", *overrides(tiny_model_dir, prompts_file, out, reward_funcs=f"{mod}:wrong", max_steps=2), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: reward function {mod}:wrong returned 1 values for 4 completions (record {prompts_file}:" in proc.stderr
    assert "Traceback" not in proc.stderr
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if n.startswith("checkpoint") or n.startswith("adapter") or n.endswith(".tmp")], left
    proc = run_cli("train", *overrides(tiny_model_dir, prompts_file, tmp_path / "r2", reward_funcs="nope_module:f"), check=False)
    assert proc.returncode == 2 and "error: reward_funcs: nope_module:f: cannot import nope_module" in proc.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tiny_model_dir, prompts_file, tmp_path):
    """Real DDP on CPU (gloo): each micro-batch (its groups whole) samples the same completions on either process."""
    common = dict(max_steps=2, lora_dropout=0.0, micro_batch_size=1, batch_size=4, grpo_loss_type="dapo")
    run_training(load_config(None, overrides(tiny_model_dir, prompts_file, tmp_path / "one", **common)), progress_bar=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "chinese_vicuna", "train", *overrides(tiny_model_dir, prompts_file, tmp_path / "two", **common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for x, y in zip(a, b):
        for key in ("loss", "reward", "completion_length"):
            assert x[key] == pytest.approx(y[key], abs=1e-4), (key, x, y)
    wa, wb = load_file(str(tmp_path / "one" / "adapter_model.safetensors")), load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_a_group_shares_its_prompts_prefill(tiny_model, tokenizer):
    """``repeat``: each prompt prefilled once, decoded num_generations times; the same completions as
    decoding the repeated prompts (same seed)."""
    from chinese_vicuna.generation.decode import GenArgs, iter_steps_batch

    model = tiny_model.eval()
    prompts = [tokenizer("第一题：三加四等于几？")["input_ids"], tokenizer("你好")["input_ids"]]
    gen = GenArgs(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=5)
    *_, shared = iter_steps_batch(model, prompts, gen, [tokenizer.eos_token_id], 0, repeat=3)
    *_, plain = iter_steps_batch(model, [p for p in prompts for _ in range(3)], gen, [tokenizer.eos_token_id], 0)
    assert [s.committed for s in shared] == [s.committed for s in plain]
    assert len({tuple(s.committed) for s in shared[:3]}) > 1  # a group's completions differ
