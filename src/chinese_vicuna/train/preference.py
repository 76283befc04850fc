"""Preference tuning inside our own trainer: DPO, IPO, ORPO, SimPO and KTO.

The trainer's loop is the same as for SFT; only the objective differs. An objective turns a
micro-batch into the *sum* of per-unit losses (tokens for SFT, pairs or replies here) and the loop
divides by the units of the whole step on all processes, so gradient accumulation and data
parallelism give the mean over the global batch, exactly as for SFT.

Log-probabilities are per-sequence sums over the reply's trained tokens, computed by the same fused
head + cross-entropy as SFT (:func:`..loss.sequence_logprobs`), chosen and rejected in one forward.
The reference model's log-probabilities (DPO, IPO, KTO) are computed once per sample: with the
trained adapter disabled when a micro-batch is first collated (the base never changes), or before
the first update for a ``ref_adapter``, a PiSSA/OLoRA start or full fine-tuning (the initial
weights). No second model is kept in memory.

Loss formulas (``pc``/``pr``: policy log-probs of chosen/rejected, ``rc``/``rr``: reference's,
``n``: reply tokens, ``b``: pref_beta, ``ls``: label_smoothing), as TRL computes them:

- dpo sigmoid: ``x = (pc - pr) - (rc - rr)``; ``-(1-ls) logsig(b x) - ls logsig(-b x)``
- dpo hinge: ``relu(1 - b x)``; robust: ``(-(1-ls) logsig(b x) + ls logsig(-b x)) / (1 - 2 ls)``
- ipo: ``((pc - rc)/n_c - (pr - rr)/n_r - 1/(2b))^2``
- orpo: ``-pc/n_c + b * -logsig(log_odds)``, ``log_odds = (ac - ar) - (log(1-e^ac) - log(1-e^ar))`` with
  ``a = p/n`` (the SFT term per pair, as in the ORPO paper; TRL weights it by tokens over the batch)
- simpo: ``x = pc/n_c - pr/n_r - gamma/b``; ``-(1-ls) logsig(b x) - ls logsig(-b x)``
- kto: desirable ``1 - sig(b (pc - rc - kl))``, undesirable ``1 - sig(b (kl - (pr - rr)))``, weighted;
  ``kl`` = clamp(mean over the step's mismatched (prompt, other reply) pairs of policy - reference, 0).

Rewards logged: ``b (p - r)`` (DPO, IPO, KTO), ``b p/n`` (ORPO, SimPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.collate import collate
from ..data.preference import KTOSample
from ..data.tokenize import IGNORE, Sample
from ..stages import get_stage

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


@dataclass
class PrefHparams:
    stage: str
    beta: float = 0.1
    loss_type: str = "sigmoid"
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    ftx: float = 0.0


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _smoothed_sigmoid(z: torch.Tensor, ls: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls


def pair_losses(
    hp: PrefHparams,
    pc: torch.Tensor,
    pr: torch.Tensor,
    nc: torch.Tensor,
    nr: torch.Tensor,
    rc: torch.Tensor | None = None,
    rr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen/rejected rewards (detached) of a paired stage."""
    b, ls = hp.beta, hp.label_smoothing
    nc, nr = nc.clamp(min=1).to(pc.dtype), nr.clamp(min=1).to(pc.dtype)
    if hp.stage in ("dpo", "ipo"):
        lc, lr = pc - rc, pr - rr
        if hp.stage == "ipo":
            losses = (lc / nc - lr / nr - 1 / (2 * b)) ** 2
        else:
            x = lc - lr
            if hp.loss_type == "sigmoid":
                losses = _smoothed_sigmoid(b * x, ls)
            elif hp.loss_type == "hinge":
                losses = torch.relu(1 - b * x)
            elif hp.loss_type == "robust":
                losses = (-(1 - ls) * F.logsigmoid(b * x) + ls * F.logsigmoid(-b * x)) / (1 - 2 * ls)
            else:
                raise ValueError(f"pref_loss_type: expected sigmoid, hinge or robust, got {hp.loss_type!r}")
        chosen_r, rejected_r = b * lc, b * lr
    elif hp.stage == "orpo":
        ac, ar = pc / nc, pr / nr
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        losses = -ac - b * F.logsigmoid(log_odds)
        chosen_r, rejected_r = b * ac, b * ar
    elif hp.stage == "simpo":
        ac, ar = pc / nc, pr / nr
        losses = _smoothed_sigmoid(b * (ac - ar - hp.simpo_gamma / b), ls)
        chosen_r, rejected_r = b * ac, b * ar
    else:
        raise ValueError(f"not a paired stage: {hp.stage!r}")
    if hp.ftx and hp.stage != "orpo":
        losses = losses + hp.ftx * (-pc / nc)
    return losses, chosen_r.detach(), rejected_r.detach()


def kto_losses(
    hp: PrefHparams,
    logp: torch.Tensor,
    ref: torch.Tensor,
    n: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-reply weighted KTO losses and rewards ``b (logp - ref)`` (detached)."""
    b = hp.beta
    ratio = logp - ref
    good = hp.desirable_weight * (1 - torch.sigmoid(b * (ratio - kl)))
    bad = hp.undesirable_weight * (1 - torch.sigmoid(b * (kl - ratio)))
    losses = torch.where(desirable, good, bad)
    if hp.ftx:
        losses = losses + desirable.to(losses.dtype) * hp.ftx * (-logp / n.clamp(min=1).to(logp.dtype))
    return losses, (b * ratio).detach()


def hparams(cfg) -> PrefHparams:
    p = cfg.pref
    return PrefHparams(
        p.stage, p.pref_beta, p.pref_loss_type, p.simpo_gamma, p.label_smoothing,
        p.kto_desirable_weight, p.kto_undesirable_weight, p.pref_ftx,
    )  # fmt: skip


class PreferenceObjective:
    """The trainer's objective for the preference stages (see :class:`..sft.SFTObjective` for SFT)."""

    log_fields = (*METRICS, "kl", *(f"val_{m}" for m in (*METRICS, "kl")))

    def __init__(self, trainer):
        self.trainer = trainer
        self.hp = hparams(trainer.cfg)
        stage = get_stage(self.hp.stage)
        self.kto = stage.records == "labelled"
        self.needs_ref = stage.needs_reference
        self._sums: dict[str, torch.Tensor] = {}
        self._kl = None

    # ---------------------------------------------------------------- data
    @staticmethod
    def length(s) -> int:
        return s.length

    def collate(self, samples: list, pad_id: int, device) -> dict:
        """Pairs: chosen rows then rejected rows of one padded batch (one forward for both)."""
        self._ensure_ref(samples)
        if self.kto:
            rows = [s.sample for s in samples]
            batch = collate(rows, pad_id)
            batch["desirable"] = torch.tensor([s.desirable for s in samples])
            batch["ref"] = torch.tensor([getattr(s, "ref", 0.0) for s in samples], dtype=torch.float32)
            batch["kl_rows"] = samples
        else:
            rows = [s.chosen for s in samples] + [s.rejected for s in samples]
            batch = collate(rows, pad_id)
            ref = [getattr(s, "ref", (0.0, 0.0)) for s in samples]
            batch["ref"] = torch.tensor([r[0] for r in ref] + [r[1] for r in ref], dtype=torch.float32)
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    @staticmethod
    def count(batch: dict) -> int:
        n = batch["input_ids"].shape[0]
        return n if "desirable" in batch else n // 2

    @staticmethod
    def trained_tokens(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    # ---------------------------------------------------------------- reference
    def _model(self):
        acc = self.trainer.accelerator
        return acc.unwrap_model(self.trainer.wrapper)

    @torch.no_grad()
    def _logps(self, rows: list[Sample]) -> torch.Tensor:
        """Log-probs of ``rows`` with the model as it is now, in eval mode (no dropout), sorted for padding."""
        t = self.trainer
        acc, wrapper = t.accelerator, self._model()
        mb = t.cfg.train.micro_batch_size * 2
        out = torch.zeros(len(rows), dtype=torch.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
        was_training = wrapper.training
        wrapper.eval()
        try:
            for start in range(0, len(order), mb):
                idx = order[start : start + mb]
                batch = collate([rows[i] for i in idx], t.tokenizer.pad_token_id)
                with acc.autocast():
                    logp, _ = wrapper(**{k: v.to(acc.device) for k, v in batch.items()}, per_sequence=True)
                out[idx] = logp.float().cpu()
        finally:
            wrapper.train(was_training)
        return out

    def _reference_context(self):
        """Context in which the model computes the reference: adapter disabled, or ref_adapter active."""
        import contextlib

        model = self._model().model
        ref = self.trainer.cfg.pref.ref_adapter
        if ref:
            return _RefAdapter(model, ref)
        if hasattr(model, "disable_adapter"):
            from ..model.variants import is_mutating

            if is_mutating(model.peft_config[model.active_adapter].init_lora_weights):
                # PiSSA/OLoRA moved the adapter's initial product out of the base weights: the original
                # model is the residual base plus the adapter as initialised, i.e. the model before any update
                return contextlib.nullcontext()
            return model.disable_adapter()
        return contextlib.nullcontext()  # full fine-tuning: called before any update, the weights are the initial ones

    def _lazy(self) -> bool:
        """The reference is the base with the adapter disabled: computable at any time, so only when needed."""
        model = self._model().model
        if self.trainer.cfg.pref.ref_adapter or not hasattr(model, "disable_adapter"):
            return False
        from ..model.variants import is_mutating

        return not is_mutating(model.peft_config[model.active_adapter].init_lora_weights)

    @staticmethod
    def _rows(s) -> list[Sample]:
        return [s.sample, s.kl] if isinstance(s, KTOSample) else [s.chosen, s.rejected]

    @staticmethod
    def _set_ref(s, a: float, b: float) -> None:
        if isinstance(s, KTOSample):
            s.ref, s.ref_kl = a, b
        else:
            s.ref = (a, b)

    def _ensure_ref(self, samples: list) -> None:
        """Reference log-probs of the samples that have none yet: one forward per micro-batch, kept for the run."""
        missing = [s for s in samples if not hasattr(s, "ref")] if self.needs_ref else []
        if not missing:
            return
        with self._reference_context():
            lp = self._logps([r for s in missing for r in self._rows(s)])
        for k, s in enumerate(missing):
            self._set_ref(s, float(lp[2 * k]), float(lp[2 * k + 1]))

    def prepare(self) -> None:
        """Reference log-probs that cannot wait: computed once, before the first update, sharded over processes.

        With the adapter disabled the reference is the base, which training never changes: each
        sample's reference is then computed when its micro-batch is first collated (the same total
        work as a pass over the data, and none for data a short run never reaches). A ``ref_adapter``,
        a PiSSA/OLoRA start or full fine-tuning need the model as it is now: all of the data, here.
        """
        if not self.needs_ref or self._lazy():
            return
        t = self.trainer
        acc = t.accelerator
        samples = list(t.data.train) + list(t.data.val)
        rows: list[Sample] = []
        for s in samples:
            rows += self._rows(s)
        mine = list(range(acc.process_index, len(rows), t.world))
        if acc.is_main_process:
            print(f"reference log-probs: {len(rows)} replies" + (f" on {t.world} processes" if t.world > 1 else ""))
        with self._reference_context():
            part = self._logps([rows[i] for i in mine])
        full = torch.zeros(len(rows), dtype=torch.float32, device=acc.device)
        full[torch.tensor(mine, dtype=torch.long, device=acc.device)] = part.to(acc.device)
        full = acc.reduce(full, "sum").cpu() if t.world > 1 else full.cpu()
        for k, s in enumerate(samples):
            self._set_ref(s, float(full[2 * k]), float(full[2 * k + 1]))

    # ---------------------------------------------------------------- loss
    def begin_step(self, batches: list[dict]) -> None:
        """KTO: the step's KL estimate from its mismatched pairs on all processes (no gradient)."""
        if not self.kto:
            return
        acc = self.trainer.accelerator
        kl_rows = [s for b in batches for s in b["kl_rows"]]
        diff = torch.zeros(2, device=acc.device)
        if kl_rows:
            pol = self._logps([s.kl for s in kl_rows])
            diff[0] = float((pol - torch.tensor([s.ref_kl for s in kl_rows])).sum())
            diff[1] = len(kl_rows)
        if self.trainer.world > 1:
            diff = acc.reduce(diff, "sum")
        self._kl = (diff[0] / diff[1].clamp(min=1)).clamp(min=0).to(torch.float32)

    def loss(self, wrapper, batch: dict) -> torch.Tensor:
        """Sum of the per-pair (per-reply for KTO) losses of one micro-batch; metrics are accumulated."""
        logp, n = wrapper(
            input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"], per_sequence=True
        )
        logp = logp.float()
        ref = batch["ref"]
        if self.kto:
            kl = self._kl if self._kl is not None else torch.zeros((), device=logp.device)
            losses, rewards = kto_losses(self.hp, logp, ref, n, batch["desirable"], kl.to(logp.device))
            d = batch["desirable"]
            self._add("rewards/chosen", rewards[d].sum(), int(d.sum()))
            self._add("rewards/rejected", rewards[~d].sum(), int((~d).sum()))
            self._add("logps/chosen", logp.detach()[d].sum(), int(d.sum()))
            self._add("logps/rejected", logp.detach()[~d].sum(), int((~d).sum()))
            self._add("kl", kl * len(d), len(d))
            return losses.sum()
        k = logp.shape[0] // 2
        losses, rc, rr = pair_losses(self.hp, logp[:k], logp[k:], n[:k], n[k:], ref[:k], ref[k:])
        self._add("rewards/chosen", rc.sum(), k)
        self._add("rewards/rejected", rr.sum(), k)
        self._add("rewards/margins", (rc - rr).sum(), k)
        self._add("rewards/accuracies", (rc > rr).float().sum(), k)
        self._add("logps/chosen", logp.detach()[:k].sum(), k)
        self._add("logps/rejected", logp.detach()[k:].sum(), k)
        return losses.sum()

    def _add(self, name: str, total: torch.Tensor, count: int) -> None:
        dev = self.trainer.accelerator.device
        acc = self._sums.setdefault(name, torch.zeros(2, device=dev))
        acc[0] += total.detach().float().to(dev)
        acc[1] += count

    def pop_metrics(self) -> dict[str, float]:
        """Means since the last call over all processes; resets."""
        acc = self.trainer.accelerator
        out = {}
        for name, v in sorted(self._sums.items()):
            v = acc.reduce(v, "sum") if self.trainer.world > 1 else v
            if float(v[1]) > 0:
                out[name] = float(v[0] / v[1])
        if "rewards/chosen" in out and "rewards/rejected" in out and "rewards/margins" not in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        self._sums = {}
        return out

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and reward metrics over the validation split (all processes)."""
        t = self.trainer
        acc = t.accelerator
        saved, self._sums = self._sums, {}
        wrapper = t.wrapper
        wrapper.eval()
        val = t.data.val
        mb = t.cfg.train.micro_batch_size
        order = sorted(range(len(val)), key=lambda i: val[i].length)
        chunks = [order[i : i + mb] for i in range(0, len(order), mb)][acc.process_index :: t.world]
        batches = [self.collate([val[i] for i in c], t.tokenizer.pad_token_id, acc.device) for c in chunks]
        total = torch.zeros(2, device=acc.device)
        if self.kto:
            kl_saved = self._kl
            self.begin_step(batches)
        for batch in batches:
            total[0] += self.loss(wrapper, batch).float()
            total[1] += self.count(batch)
        if self.kto:
            self._kl = kl_saved
        total = acc.reduce(total, "sum") if t.world > 1 else total
        out = {"val_loss": float(total[0] / total[1].clamp(min=1))}
        out.update({f"val_{k}": v for k, v in self.pop_metrics().items()})
        self._sums = saved
        wrapper.train()
        return out


class _RefAdapter:
    """Load ``path`` as a second adapter named ``ref`` and make it the active one for the block.

    peft's ``set_adapter`` marks the active adapter trainable; the previous ``requires_grad`` flags
    are restored on exit, and the reference adapter is deleted (its log-probs are all we keep).
    """

    def __init__(self, model, path: str):
        self.model, self.path = model, path

    def __enter__(self):
        from ..model.adapters import load_adapter, resolve_adapter

        self.flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.active = self.model.active_adapter
        load_adapter(self.model, resolve_adapter(self.path), name="ref")
        self.model.set_adapter("ref")
        return self

    def __exit__(self, *exc):
        self.model.set_adapter(self.active)
        self.model.delete_adapter("ref")
        for n, p in self.model.named_parameters():
            if n in self.flags:
                p.requires_grad_(self.flags[n])
        return False


