"""GRPO (and Dr. GRPO, DAPO) inside our own trainer: online RL from prompts and reward functions.

Each optimizer step (every ``num_iterations`` steps) the objective samples ``num_generations``
completions per prompt from the policy's current weights with our batched KV-cache decoder (each
micro-batch's groups in one batch), scores them with the reward functions (:mod:`.rewards`),
turns the weighted rewards into group-normalised advantages and trains on the completions. The
loop, accumulation and data parallelism are the trainer's; this module supplies the rollout and
the loss, which equal TRL's ``GRPOTrainer`` (``_generate_and_score_completions`` and
``_compute_loss``; ``multi_objective_aggregation="sum_then_normalize"``, token-level importance
sampling):

- reward ``r = nansum_k w_k r_k`` (a completion for which every function returned None is left out
  of its group's statistics and gets advantage 0);
- advantage ``A = r - mean_group(r)``, divided by ``std_group(r) + 1e-4`` (Bessel-corrected) for
  ``grpo`` and ``dapo``; Dr. GRPO does not divide;
- per token ``l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3``, ``rho =
  exp(logp - logp_old)`` (``logp_old`` = the sampling policy's, so rho = 1 when num_iterations is 1),
  ``k3 = exp(ref - logp) - (ref - logp) - 1`` against the adapter-disabled base;
- ``grpo``: the mean over completions of each completion's token mean; ``dr_grpo``: the token sum
  over (completions x max_new_tokens); ``dapo``: the mean over all the step's completion tokens.

Sampling is reproducible: the generator of micro-batch ``k`` of step ``s`` is seeded from
(seed, s, k), with ``k`` counted over all processes, so a resumed run and a DDP run sample what one
uninterrupted process samples. Groups never straddle processes (a micro-batch holds whole prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.collate import collate
from ..data.tokenize import IGNORE, Sample
from .rewards import load_rewards, score_group

CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@dataclass
class GRPOHparams:
    num_generations: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    num_iterations: int = 1
    dynamic_sampling: bool = False


def hparams(cfg) -> GRPOHparams:
    g = cfg.grpo
    return GRPOHparams(
        g.num_generations, g.max_new_tokens, g.temperature, g.top_p, g.grpo_loss_type, g.epsilon_low,
        g.epsilon_low if g.epsilon_high is None else g.epsilon_high, g.beta, g.num_iterations, g.dynamic_sampling,
    )  # fmt: skip


# ----------------------------------------------------------------------------- formulas
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (TRL's ``nanstd``)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keepdim) if dim is not None else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keepdim) if dim is not None else (~torch.isnan(x)).sum()
    return torch.sqrt(var * count / (count - 1))


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages ``[n]`` of rewards ``[n]`` (NaN = unscorable) in consecutive groups, and whether each row's
    group has zero std."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    std = nanstd(grouped, dim=1).repeat_interleave(group)
    adv = rewards - mean
    if scale:
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def token_losses(
    hp: GRPOHparams, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, ref: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token losses ``[b, t]`` and the per-token statistics (ratios clipped low/high, k3 KL)."""
    coef1 = torch.exp(logp - old)
    coef2 = torch.clamp(coef1, 1 - hp.epsilon_low, 1 + hp.epsilon_high)
    a = adv[:, None]
    loss = -torch.min(coef1 * a, coef2 * a)
    low = (coef1 < 1 - hp.epsilon_low) & (a < 0)
    high = (coef1 > 1 + hp.epsilon_high) & (a > 0)
    stats = {"low": low, "high": high, "region": low | high}
    if hp.beta != 0.0 and ref is not None:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        loss = loss + hp.beta * kl
        stats["kl"] = kl.detach()
    return loss, stats


def sequence_losses(hp: GRPOHparams, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each completion's share ``[b]`` of the loss *sum*; the trainer divides by the step's units
    (completions for grpo/dr_grpo, completion tokens for dapo: :meth:`GRPOObjective.count`)."""
    m = mask.to(per_token.dtype)
    total = (per_token * m).sum(-1)
    if hp.loss_type == "grpo":
        return total / m.sum(-1).clamp(min=1.0)
    if hp.loss_type == "dr_grpo":
        return total / hp.max_new_tokens
    if hp.loss_type == "dapo":
        return total
    raise ValueError(f"grpo_loss_type: expected grpo, dr_grpo or dapo, got {hp.loss_type!r}")


# ----------------------------------------------------------------------------- the objective
class GRPOObjective:
    """The trainer's objective for ``stage: grpo`` (see :class:`.sft.SFTObjective` for the interface).

    A collated micro-batch holds prompts; :meth:`begin_step` samples and scores their completions
    (the trainer calls it before counting the step's units) and fills in the training tensors.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.hp = hparams(trainer.cfg)
        g = trainer.cfg.grpo
        self.rewards = load_rewards(g.reward_funcs, g.max_new_tokens)
        self.weights = torch.tensor(g.reward_weights or [1.0] * len(self.rewards), dtype=torch.float32)
        self.repeat = self.hp.num_iterations
        """Optimizer steps per data batch (the trainer's data plan asks)."""
        per_func = [f"rewards/{r.name}/{s}" for r in self.rewards for s in ("mean", "std")]
        names = ("reward", "reward_std", *per_func, "frac_reward_zero_std", "completion_length", "kl", *CLIP_METRICS)
        self.log_fields = (*names, *(f"val_{n}" for n in ("reward", "reward_std", *per_func, "completion_length")))
        self._sums: dict[str, torch.Tensor] = {}
        self._cache: tuple[int, list[dict]] | None = None
        """(step of the rollout, this process's filled micro-batches) while num_iterations > 1."""
        self._loaded: dict | None = None

    # ---------------------------------------------------------------- data
    def length(self, s) -> int:
        return s.length + self.hp.max_new_tokens

    def collate(self, samples: list, pad_id: int, device) -> dict:
        return {"prompts": samples}

    @staticmethod
    def count(batch: dict) -> int:
        return batch["units"]

    @staticmethod
    def trained_tokens(batch: dict) -> int:
        return int(batch["mask"].sum())

    def prepare(self) -> None:
        pass

    # ---------------------------------------------------------------- rollout
    def _model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.wrapper).model

    def _seed(self, step: int, index: int) -> int:
        return (self.trainer.cfg.train.seed * 1_000_003 + step * 10_007 + index) % (2**62)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """``num_generations`` completions of each prompt, in one batch; each prompt is prefilled once."""
        from ..generation.decode import GenArgs, eos_ids, iter_steps_batch

        t = self.trainer
        model, tok, hp = self._model(), t.tokenizer, self.hp
        gen = GenArgs(max_new_tokens=hp.max_new_tokens, do_sample=True, temperature=hp.temperature, top_p=hp.top_p,
                      top_k=0, repetition_penalty=1.0, seed=seed)  # fmt: skip
        eos = eos_ids(model, tok) + [i for i in t.template.end_token_ids() if i not in eos_ids(model, tok)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        was_training = model.training
        model.eval()
        try:
            with t.accelerator.autocast():
                final = []
                for steps in iter_steps_batch(model, prompts, gen, eos, pad, repeat=hp.num_generations):
                    final = steps
        finally:
            model.train(was_training)
        return [list(s.committed) for s in final]

    @torch.no_grad()
    def _token_logps(self, batch: dict, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs ``[b, t-1]`` of the completions with the model as it is now (eval mode)."""
        t = self.trainer
        wrapper = t.accelerator.unwrap_model(t.wrapper)
        was_training = wrapper.training
        wrapper.eval()
        try:
            ctx = self._model().disable_adapter() if reference else _null()
            with ctx, t.accelerator.autocast():
                lp, _ = wrapper(input_ids=batch["input_ids"], labels=batch["labels"],
                                attention_mask=batch["attention_mask"], per_token=True)  # fmt: skip
        finally:
            wrapper.train(was_training)
        return lp.float()

    def rollout(self, samples: list, seed: int, train: bool = True) -> dict:
        """Sample, score and tensorise one micro-batch of prompts: the training batch with advantages."""
        t, hp, G = self.trainer, self.hp, self.hp.num_generations
        device = t.accelerator.device
        completions = self._generate([s.prompt_ids for s in samples], seed)
        prompts = [s.prompt_ids for s in samples for _ in range(G)]
        tok = t.tokenizer
        texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
        per_func = []
        for j, s in enumerate(samples):
            rec = s.record
            rows = slice(j * G, (j + 1) * G)
            comps = [[{"role": "assistant", "content": x}] for x in texts[rows]] if rec.conversational else texts[rows]
            fields = {k: [v] * G for k, v in rec.fields.items()}
            per_func.append(score_group(self.rewards, [rec.reward_prompt] * G, comps, completions[rows], fields, rec.source))
        # [n, funcs]: groups in order, each [funcs][G] transposed
        rewards = torch.tensor([[g[k][i] for k in range(len(self.rewards))] for g in per_func for i in range(G)],
                               dtype=torch.float32).view(len(prompts), len(self.rewards))  # fmt: skip
        total = (rewards * self.weights[None]).nansum(1)
        total[torch.isnan(rewards).all(1)] = math.nan
        adv, std_zero = group_advantages(total, G, scale=hp.loss_type != "dr_grpo")
        keep = ~std_zero if hp.dynamic_sampling else torch.ones_like(std_zero)
        rows = [Sample(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompts, completions)]
        batch = {k: v.to(device) for k, v in collate(rows, tok.pad_token_id if tok.pad_token_id is not None else 0).items()}
        mask = (batch["labels"][:, 1:] != IGNORE) & keep.to(device)[:, None]
        batch.update(adv=adv.to(device), keep=keep.to(device), mask=mask)
        batch["units"] = int(mask.sum()) if hp.loss_type == "dapo" else int(keep.sum())
        if hp.num_iterations > 1 and train:
            batch["old"] = self._token_logps(batch)
        if hp.beta != 0.0 and train:
            batch["ref"] = self._token_logps(batch, reference=True)
        self._log_rollout(rewards, total, std_zero, completions)
        return batch

    def _log_rollout(self, rewards, total, std_zero, completions) -> None:
        for k, r in enumerate(self.rewards):
            self._moments(f"rewards/{r.name}", rewards[:, k])
        self._moments("reward", total)
        self._add("frac_reward_zero_std", std_zero.float().sum(), len(std_zero))
        self._add("completion_length", torch.tensor(float(sum(map(len, completions)))), len(completions))

    def begin_step(self, batches: list[dict]) -> None:
        """Sample and score this step's completions (or reuse those of the step's rollout when num_iterations > 1)."""
        t = self.trainer
        step = t.progress.step
        first = step - (step - t.progress.data_offset) % self.repeat
        if self._loaded is not None:  # a resumed run: the rollout the checkpoint's step was training on
            state, self._loaded = self._loaded, None
            if state["step"] == first:
                self._cache = (first, [{k: (v.to(t.accelerator.device) if isinstance(v, torch.Tensor) else v)
                                        for k, v in b.items()} for b in state["batches"]])  # fmt: skip
        if self._cache is not None and self._cache[0] == first:
            for b, cached in zip(batches, self._cache[1]):
                b.update(cached)
            return
        acc = t.accelerator
        for k, b in enumerate(batches):
            index = acc.process_index + k * t.world  # the micro-batch's number over all processes
            b.update(self.rollout(b["prompts"], self._seed(first, index)))
        self._cache = (first, [{k: v for k, v in b.items() if k != "prompts"} for b in batches]) if self.repeat > 1 else None

    # ---------------------------------------------------------------- loss
    def loss(self, wrapper, batch: dict) -> torch.Tensor:
        logp, _ = wrapper(input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                          per_token=True)  # fmt: skip
        logp = logp.float()
        mask = batch["mask"]
        old = batch["old"] if "old" in batch else logp.detach()
        per_token, stats = token_losses(self.hp, logp, old, batch["adv"], batch.get("ref"))
        m = mask.float()
        n = m.sum()
        for name, key in zip(CLIP_METRICS, ("low", "high", "region")):
            self._add(name, (stats[key].float() * m).sum(), n)
        if "kl" in stats:
            self._add("kl", (stats["kl"] * m).sum(), n)
        return sequence_losses(self.hp, per_token, mask).sum()

    # ---------------------------------------------------------------- metrics
    def _add(self, name: str, total: torch.Tensor, count, sq: torch.Tensor | None = None) -> None:
        dev = self.trainer.accelerator.device
        acc = self._sums.setdefault(name, torch.zeros(3, device=dev))
        acc[0] += total.detach().float().to(dev)
        acc[1] += float(count)
        if sq is not None:
            acc[2] += sq.detach().float().to(dev)

    def _moments(self, name: str, values: torch.Tensor) -> None:
        v = values[~torch.isnan(values)]
        self._add(name, v.sum(), v.numel(), (v * v).sum())

    def pop_metrics(self) -> dict[str, float]:
        """Means (and reward stds) since the last call over all processes; resets.

        Every process reduces every metric, in one order, whether or not it has seen it (an evaluation
        may leave a process without prompts): collective calls must match.
        """
        acc = self.trainer.accelerator
        names = ["reward", *(f"rewards/{r.name}" for r in self.rewards), "frac_reward_zero_std", "completion_length", "kl",
                 *CLIP_METRICS]  # fmt: skip
        out = {}
        for name in names:
            v = self._sums.get(name)
            if v is None:
                v = torch.zeros(3, device=acc.device)
            v = acc.reduce(v, "sum") if self.trainer.world > 1 else v
            s, n, sq = float(v[0]), float(v[1]), float(v[2])
            if n <= 0:
                continue
            out[name if not name.startswith("rewards/") else f"{name}/mean"] = s / n
            if name == "reward" or name.startswith("rewards/"):
                var = (sq - s * s / n) / (n - 1) if n > 1 else 0.0
                out["reward_std" if name == "reward" else f"{name}/std"] = math.sqrt(max(var, 0.0))
        self._sums = {}
        return out

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Rewards of completions sampled for the validation prompts (a fixed seed: evaluations compare);
        ``val_loss`` is minus the mean reward, so the best checkpoint has the highest."""
        t = self.trainer
        acc = t.accelerator
        saved, self._sums = self._sums, {}
        val, mb = t.data.val, t.cfg.train.micro_batch_size
        chunks = [val[i : i + mb] for i in range(0, len(val), mb)]
        for k in range(acc.process_index, len(chunks), t.world):
            self.rollout(chunks[k], self._seed(-1, k), train=False)
        metrics = self.pop_metrics()
        self._sums = saved
        out = {"val_loss": -metrics.get("reward", 0.0)}
        out.update({f"val_{k}": v for k, v in metrics.items() if k != "frac_reward_zero_std"})
        return out

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        """The rollout being trained on (num_iterations > 1), every process's, so a resume continues it."""
        from accelerate.utils import gather_object

        mine = None
        if self._cache is not None:
            mine = [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in self._cache[1]]
        per_process = gather_object([mine]) if self.trainer.world > 1 else [mine]
        return {"step": self._cache[0] if self._cache else None, "world": self.trainer.world, "per_process": per_process}

    def load_state_dict(self, state: dict) -> None:
        if state.get("step") is None:
            return
        if state["world"] != self.trainer.world:
            from ..config import ConfigError

            raise ConfigError(f"resume: this checkpoint is inside a GRPO rollout (num_iterations) made by {state['world']} "
                              f"processes; resume it with {state['world']} processes or from a checkpoint at a multiple of num_iterations")
        self._loaded = {"step": state["step"], "batches": state["per_process"][self.trainer.accelerator.process_index]}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
