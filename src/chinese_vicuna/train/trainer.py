"""The trainer of every stage: ``setup()`` builds model, data and optimizer, ``train()`` runs the loop, ``save()`` writes.

The loop is ours and visible; the engine is accelerate, so the same code runs on one CPU/GPU,
under ``accelerate launch``/``torchrun`` (DDP), DeepSpeed ZeRO or FSDP, chosen by the launch
config. Each optimizer step consumes ``batch_size`` samples split into micro-batches across
processes; the loss is the mean over the trained tokens of that whole step.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.collate import collate, plan_batches, plan_packed
from ..data.datasets import PreparedData, parse_source, prepare
from ..data.grpo import prepare_prompts
from ..data.preference import prepare_preferences
from ..data.templates import get_template
from ..data.tokenize import Renderer, save_tokenizer
from ..model.adapters import META_FILE, attach_lora, trainable_summary
from ..model.load import load_model_and_tokenizer, resolve_base_model, training_precision
from ..model.quantize import prepare_for_kbit_training
from ..model.variants import keep_initial_adapter, make_optimizer
from ..stages import get_stage
from . import heap
from .callbacks import StopRequest, TrainLogger
from .checkpoint import (
    Progress,
    checkpoint_step,
    clean_partial,
    find_resume,
    gathered_state_dict,
    is_trainer_checkpoint,
    load_adapter_weights,
    prune_checkpoints,
    resume_trainer_checkpoint,
    save_checkpoint,
    save_pretrained,
)
from .grpo import GRPOObjective
from .kernels import LOWMEM_ATTENTION, apply_training_kernels, register_attention
from .loss import CausalLMLoss
from .plan import compare_line, model_config, needs_checkpointing, plan_run
from .preference import PreferenceObjective
from .sft import SFTObjective

StepCallback = Callable[["Trainer", int, dict], None]


def upcast_trainable(model: torch.nn.Module) -> list[str]:
    """Store every trainable parameter in fp32; returns the names of those that were not.

    peft keeps LoRA matrices fp32 whatever the base dtype, but a ``modules_to_save`` layer
    (embed_tokens, lm_head for vocabulary extension) is a copy of the base module, so with the
    base loaded in bf16/fp16 it would train in 16 bits: AdamW's state would be created in that
    dtype and small updates would round away. Autocast still runs its matmuls in the compute
    dtype. Parameters are changed in place (``p.data``), so tied weights stay one tensor.
    """
    changed = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            changed.append(name)
    return changed


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of every decoder layer (transformers' own switch).

    Non-reentrant: it needs no input that requires grad (LoRA/QLoRA train nothing below the first
    layer) and replays dropout with the saved RNG state, so gradients equal those without it.
    Reentrant for an 8-bit base: bitsandbytes' int8 matmul keeps its input on the autograd context
    (``ctx.tensors`` / ``ctx.A``), not as a saved tensor, so non-reentrant checkpointing cannot drop
    it and every layer's inputs stayed until backward (LLaMA-7B 8-bit, 2 x 2048 tokens: 28.4 GB on
    an H200, against 15.9 GB with 16-bit weights). Reentrant checkpointing runs the layer's forward
    without autograd, so nothing is kept; it needs an input that requires grad (the embeddings' output).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reentrant = bool(getattr(base, "is_loaded_in_8bit", False))
    if reentrant:
        base.enable_input_require_grads()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})


class Trainer:
    """One trainer for every stage (``sft``, ``pretrain``, the preference stages, ``grpo``); the stage's objective
    (:mod:`.sft`, :mod:`.preference`, :mod:`.grpo`) supplies what differs: lengths, collation, units and the loss."""

    def __init__(self, cfg: TrainConfig, callbacks: list[StepCallback] | None = None, progress_bar: bool = True):
        self.cfg = cfg
        self.callbacks = callbacks or []
        self.progress_bar = progress_bar
        self.progress = Progress()
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Build everything a run needs, in order; each step is a method below."""
        self.setup_accelerator()
        self.setup_model()
        self.setup_adapters()
        self.setup_data()
        self.setup_plan()
        self.setup_optimizer()
        self.setup_resume()
        return self

    def setup_accelerator(self) -> None:
        """Threads, precision, the accelerate engine (single process, DDP, DeepSpeed, FSDP), the seed."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        cfg, t = self.cfg, self.cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        cfg.model.base_model = resolve_base_model(cfg.model.base_model)
        # bf16/fp16 compute through autocast (accelerate's mixed precision), see training_precision.
        self.mixed_precision, self.load_dtype = training_precision(cfg.model.dtype, cfg.lora.finetuning == "full")
        # accelerate keeps one global state per process; a second run in the same process (a notebook,
        # the tests) may ask for another precision, so forget the previous run's (not the process group).
        AcceleratorState._reset_state(reset_partial_state=False)
        # cpu=True lets accelerate pick gloo DDP on CPU-only machines under torchrun/accelerate launch.
        asked = {k: os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true" for k in ("DEEPSPEED", "FSDP")}
        self.accelerator = acc = Accelerator(mixed_precision=self.mixed_precision, cpu=not torch.cuda.is_available())
        self.world = acc.num_processes
        engine = acc.distributed_type.value
        if acc.is_main_process:
            shown = "single process" if engine == "NO" else engine  # accelerate's name for no distribution is "NO"
            print(f"engine: {shown}, {self.world} process{'es' if self.world > 1 else ''} on {acc.device.type}"
                  + (f", allocator {heap.loaded_allocator()}" if acc.device.type == "cpu" else ""))
            for name, on in asked.items():
                if on and engine != name:  # accelerate's FSDP/DeepSpeed need an accelerator; it says nothing itself
                    print(f"warning: the launch config asks for {name}, but accelerate runs {engine} on "
                          f"{acc.device.type} (its {name} needs a GPU): plain data parallel, nothing sharded")
        set_seed(t.seed)
        if acc.is_main_process:
            clean_partial(t.output_dir)

    def setup_model(self) -> None:
        """The base model and tokenizer (quantized if asked), after checking the shape against cutoff_len."""
        cfg, acc = self.cfg, self.accelerator
        # the model config alone first: a cutoff_len past the (rope-scaled) context fails before the weights load
        _, self.shape = model_config(cfg)
        model, tok = load_model_and_tokenizer(
            cfg.model.base_model,
            dtype=self.load_dtype,
            quantization=cfg.model.quantization,
            attn_implementation=self._attention(),
            trust_remote_code=cfg.model.trust_remote_code,
            device=str(acc.device) if cfg.model.quantization != "none" else None,
            rope_scaling=cfg.model.rope_scaling,
        )
        if cfg.model.quantization != "none":
            model = prepare_for_kbit_training(model)
        self.model, self.tokenizer = model, tok

    def setup_adapters(self) -> None:
        """LoRA (and its variants) on the base, or every weight trainable; trainable weights in fp32; kernels."""
        cfg, acc, model = self.cfg, self.accelerator, self.model
        if cfg.lora.finetuning == "lora":
            model = attach_lora(
                model,
                r=cfg.lora.lora_r,
                alpha=cfg.lora.lora_alpha,
                dropout=cfg.lora.lora_dropout,
                targets=cfg.lora.lora_target_modules,
                modules_to_save=cfg.lora.modules_to_save,
                init_adapter=cfg.lora.init_adapter,
                use_dora=cfg.lora.use_dora,
                use_rslora=cfg.lora.use_rslora,
                lora_init=cfg.lora.lora_init,
                pissa_niter=cfg.lora.pissa_niter,
            )
            # PiSSA/OLoRA: the adapter as initialised, so that save() writes the trained one as plain LoRA
            self.initial_adapter = keep_initial_adapter(model, acc.is_main_process)
        else:
            model.requires_grad_(True)
        upcast_trainable(model)
        if cfg.train.fast_kernels:
            swapped = apply_training_kernels(model, autocast=self.mixed_precision != "no")
            if acc.is_main_process and swapped:
                print("kernels: " + ", ".join(swapped + [model.config._attn_implementation]))
        model.config.use_cache = False
        self.model = model
        if acc.is_main_process:
            print(trainable_summary(model))

    def setup_data(self) -> None:
        """Records -> samples (train/validation) for the stage, its objective, and the step count."""
        cfg, t, acc, d = self.cfg, self.cfg.train, self.accelerator, self.cfg.data
        self.stage = stage = get_stage(cfg.pref.stage)
        self.template = get_template(d.template, self.tokenizer, d.system_prompt)
        # preference stages train the final reply only: chosen and rejected differ there
        mask = "last" if stage.preference else d.mask
        self.renderer = Renderer(self.tokenizer, self.template, d.cutoff_len, mask, d.overlong)
        data_args = dict(
            val_size=d.val_size,
            seed=t.seed,
            dedup=d.dedup,
            on_bad_record=d.on_bad_record,
            max_samples=d.max_samples,
            rejects_path=str(Path(t.output_dir) / "rejects.jsonl"),
            progress=acc.is_main_process and self.progress_bar,
        )
        sources = [parse_source(s, stage.data_format or d.format) for s in d.data_path]
        if stage.objective == "grpo":
            self.data = prepare_prompts(self.renderer, sources, **data_args)
            self.objective = GRPOObjective(self)
        elif stage.preference:
            self.data = prepare_preferences(self.renderer, sources, stage.name, **data_args)
            self.objective = PreferenceObjective(self)
        else:
            self.data: PreparedData = prepare(self.renderer, sources, **data_args)
            self.objective = SFTObjective(self)
        if acc.is_main_process:
            print("data: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.data.stats.items()))

        self.micro_per_step = t.batch_size // t.micro_batch_size
        if self.micro_per_step % self.world:
            raise ValueError(
                f"batch_size/micro_batch_size = {self.micro_per_step} micro-batches per step cannot be "
                f"split over {self.world} processes"
            )
        self.lengths = [self.objective.length(s) for s in self.data.train]
        n_micro = len(self._epoch_plan(0))
        # GRPO's num_iterations: each data batch trains that many optimizer steps
        self.repeat = getattr(self.objective, "repeat", 1)
        self.steps_per_epoch = max(1, math.ceil(n_micro / self.micro_per_step)) * self.repeat
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_epochs * self.steps_per_epoch))

    def setup_plan(self) -> None:
        """The memory plan of this run; gradient checkpointing on where it says the run would not fit."""
        acc = self.accelerator
        self.checkpointing, self.memory_plan = needs_checkpointing(
            plan_run(self.cfg, self.shape, self.lengths, device=acc.device.type))
        if self.checkpointing:
            enable_checkpointing(self.model)
        if acc.is_main_process:
            print(f"memory plan: predicted peak {self.memory_plan.peak_mib} MiB on {acc.device.type}, gradient "
                  f"checkpointing {'on' if self.checkpointing else 'off'} (`chinese-vicuna plan` for the breakdown)")

    def setup_optimizer(self) -> None:
        """The optimizer over the trainable weights, the loss wrapper, both through accelerate."""
        cfg, t, acc, model = self.cfg, self.cfg.train, self.accelerator, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                        loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio)
        self.wrapper = CausalLMLoss(model, t.loss_chunk_size)
        if getattr(acc.state, "deepspeed_plugin", None) is not None:
            # no dataloader goes through prepare(), so DeepSpeed is told the micro-batch size here
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        self.wrapper, self.optimizer = acc.prepare(self.wrapper, self.optimizer)
        self._trainable = params
        self.objective.prepare()  # the reference log-probs, from the initial weights (before any resume)

    def setup_resume(self) -> None:
        """The learning-rate schedule, what a checkpoint holds, and the checkpoint to resume from."""
        from transformers import get_scheduler

        cfg, t, acc = self.cfg, self.cfg.train, self.accelerator
        self.resumed_from: Path | None = None
        start = 0
        if t.resume:
            ckpt = find_resume(t.output_dir, t.resume)
            start = checkpoint_step(ckpt)
        if t.new_data:
            self.total_steps = start + (t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * self.steps_per_epoch))
        warmup = t.warmup_steps or int(t.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(t.lr_scheduler, self.optimizer, warmup, self.total_steps)
        acc.register_for_checkpointing(self.scheduler, self.progress)
        if hasattr(self.objective, "state_dict"):  # GRPO: the rollout a step inside num_iterations trains on
            acc.register_for_checkpointing(self.objective)
        if cfg.lora.finetuning == "lora":
            # Checkpoints hold the adapter (saved by us), not the frozen base weights.
            acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
            acc.register_load_state_pre_hook(lambda models, inp: models.clear())
        if t.resume:
            self._resume(ckpt, t.new_data)

    def _attention(self) -> str:
        name = self.cfg.model.attn_implementation
        if name == "auto":
            if torch.cuda.is_available():
                return "sdpa"
            name = LOWMEM_ATTENTION if self.cfg.train.fast_kernels else "eager"
        if name == LOWMEM_ATTENTION:
            register_attention()
        return name

    def _resume(self, ckpt: Path, new_data: bool) -> None:
        model = self.accelerator.unwrap_model(self.wrapper).model
        if is_trainer_checkpoint(ckpt):  # a transformers Trainer's (the seeds' scripts): adapter, AdamW, step
            self.progress.step = resume_trainer_checkpoint(model, self.optimizer, self.scheduler, ckpt)
        else:
            if self.cfg.lora.finetuning == "lora":
                load_adapter_weights(model, ckpt)
            self.accelerator.load_state(str(ckpt))
        if new_data:
            self.progress.data_offset = self.progress.step
            self.progress.best_val = self.progress.best_step = None
        self.resumed_from = ckpt
        if self.accelerator.is_main_process:
            print(f"resumed from {ckpt} at step {self.progress.step}" + (" (new data from its start)" if new_data else ""))

    # ------------------------------------------------------------------ data plan
    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_plan_epoch", None) == epoch:
            return self._plan
        t, d = self.cfg.train, self.cfg.data
        if d.packing:
            plan = plan_packed(self.lengths, t.micro_batch_size * d.cutoff_len, t.seed, epoch)
        else:
            plan = plan_batches(self.lengths, t.micro_batch_size, t.seed, epoch, d.group_by_length)
        # Every process needs the same number of micro-batches in every step.
        plan = plan[: len(plan) - len(plan) % self.world] if self.world > 1 else plan
        self._plan_epoch, self._plan = epoch, plan
        return plan

    def _collate(self, samples: list) -> dict[str, torch.Tensor]:
        return self.objective.collate(samples, self.tokenizer.pad_token_id, self.accelerator.device)

    def step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches for optimizer step ``step`` (a pure function of the step)."""
        rel = (step - self.progress.data_offset) // self.repeat
        epoch, within = divmod(rel, self.steps_per_epoch // self.repeat)
        plan = self._epoch_plan(epoch)
        chunk = plan[within * self.micro_per_step : (within + 1) * self.micro_per_step]
        mine = chunk[self.accelerator.process_index :: self.world]
        return [self._collate([self.data.train[i] for i in mb]) for mb in mine]

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        acc, t = self.accelerator, self.cfg.train
        start = self.progress.step
        log = TrainLogger(
            t.output_dir, self.total_steps, start, t.report_to, acc.is_main_process, self.cfg.flat(), self.progress_bar,
            self.objective.log_fields,
        )
        self.logger = log
        self.wrapper.train()
        # wall time of the optimisation alone (evaluation and checkpoint writing kept apart)
        self.timing = {"train_s": 0.0, "eval_s": 0.0, "save_s": 0.0}
        tick = time.perf_counter()
        loss_acc = torch.zeros((), device=acc.device)
        tok_acc = torch.zeros((), device=acc.device)
        metrics: dict = {}
        # SIGTERM / Ctrl-C / a STOP file: finish the step, write a checkpoint, return (resume continues it)
        stop = StopRequest(t.output_dir, acc)
        # glibc's malloc (no jemalloc): its heap's freed pages back to the system after each step
        trim_step = acc.device.type == "cpu" and heap.loaded_allocator() == "glibc"
        self.stopped_at: int | None = None
        try:  # an exception in the loop (a callback, Ctrl-C twice) must not leave our handlers installed
            for step in range(start, self.total_steps):
                batches = self.step_batches(step)
                # before counting: GRPO samples the step's completions here (KTO: its KL estimate)
                self.objective.begin_step(batches)
                # the step's units (trained tokens; pairs or replies for preference stages; completions or
                # completion tokens for GRPO) on all processes
                n_local = sum(self.objective.count(b) for b in batches)
                n_global = acc.reduce(torch.tensor(float(n_local), device=acc.device), "sum")
                step_loss = torch.zeros((), device=acc.device)
                for i, batch in enumerate(batches):
                    last = i == len(batches) - 1
                    ctx = contextlib.nullcontext() if last else acc.no_sync(self.wrapper)
                    # accelerate's DeepSpeed engine steps inside backward() whenever sync_gradients is set (and
                    # nothing else in this loop sets it): only the step's last micro-batch may be a boundary.
                    acc.gradient_state._set_sync_gradients(last)
                    with ctx:
                        loss_sum = self.objective.loss(self.wrapper, batch)
                        # mean over the trained tokens (pairs) of the whole step, on every process
                        acc.backward(loss_sum * self.world / n_global.clamp(min=1))
                    step_loss += loss_sum.detach()
                    mask = batch.get("attention_mask")
                    log.tokens(int(mask.sum()) if mask is not None else batch["input_ids"].numel(), 0)
                log.tokens(0, sum(self.objective.trained_tokens(b) for b in batches))
                grad_norm = None
                if t.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self._trainable, t.max_grad_norm)
                self.optimizer.step()
                # fp16: a step whose gradients overflowed was skipped by the grad scaler (which lowered its
                # scale instead); the schedule must not advance for an update that never happened.
                if not self.optimizer.step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if trim_step:
                    heap.trim()
                self.progress.step = step + 1
                loss_acc += step_loss
                tok_acc += n_global / self.world
                log.advance()
                done = step + 1
                metrics = {}
                if done % t.logging_steps == 0 or done == self.total_steps or done == start + 1:
                    total_loss = acc.reduce(loss_acc, "sum")
                    total_tok = acc.reduce(tok_acc, "sum")
                    metrics["loss"] = float(total_loss / total_tok.clamp(min=1))
                    metrics["lr"] = self.scheduler.get_last_lr()[0]
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    metrics.update(self.objective.pop_metrics())
                    loss_acc.zero_()
                    tok_acc.zero_()
                now = time.perf_counter()
                self.timing["train_s"] += now - tick
                tick = now
                if self.data.val and (done % t.eval_steps == 0 or done == self.total_steps):
                    metrics["val_loss"] = self.evaluate()
                    if trim_step:
                        heap.trim()
                    metrics.update(self.last_eval)
                    if self.progress.best_val is None or metrics["val_loss"] < self.progress.best_val:
                        self.progress.best_val, self.progress.best_step = metrics["val_loss"], done
                if metrics:
                    row = log.log(done, (done - self.progress.data_offset) / self.steps_per_epoch, **metrics)
                    self.history.append(row)
                self.timing["eval_s"] += time.perf_counter() - tick
                tick = time.perf_counter()
                if done % t.save_steps == 0 or done == self.total_steps:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self, done, metrics)
                self.timing["save_s"] += time.perf_counter() - tick
                tick = time.perf_counter()
                if done < self.total_steps and stop.requested():
                    if done % t.save_steps:
                        self.save_checkpoint()
                    self.stopped_at = done
                    break
        finally:
            stop.close()
        log.close("stopped" if self.stopped_at else "finished")
        if acc.is_main_process:
            print(compare_line(self.memory_plan.peak_mib, self.memory_plan.device))
        if self.stopped_at is None:
            self.save()
        return self.history[-1] if self.history else {}

    def evaluate(self) -> float:
        """The validation loss (all processes); other validation metrics go to ``last_eval``."""
        self.last_eval = self.objective.evaluate()
        return self.last_eval["val_loss"]

    @torch.no_grad()
    def evaluate_tokens(self) -> float:
        """Mean cross-entropy per trained token over the validation split (all processes)."""
        acc = self.accelerator
        self.wrapper.eval()
        val = self.data.val
        order = sorted(range(len(val)), key=lambda i: len(val[i].input_ids))
        mb = self.cfg.train.micro_batch_size
        batches = [order[i : i + mb] for i in range(0, len(order), mb)][acc.process_index :: self.world]
        total = torch.zeros((), device=acc.device)
        count = torch.zeros((), device=acc.device)
        for idx in batches:
            batch = collate([val[i] for i in idx], self.tokenizer.pad_token_id)  # padded even when packing
            loss_sum, n = self.wrapper(**{k: v.to(acc.device) for k, v in batch.items()})
            total += loss_sum.float()
            count += n
        self.wrapper.train()
        return float(acc.reduce(total, "sum") / acc.reduce(count, "sum").clamp(min=1))

    # ------------------------------------------------------------------ saving
    def _extra_files(self) -> dict[str, str]:
        import json

        meta = {
            "template": self.cfg.data.template,
            "system_prompt": self.cfg.data.system_prompt,
            "base_model": self.cfg.model.base_model,
            "finetuning": self.cfg.lora.finetuning,
        }
        return {
            "run_config.yaml": self.cfg.to_yaml(),
            META_FILE: json.dumps(meta, ensure_ascii=False, indent=2),
        }

    def save_checkpoint(self) -> Path:
        model = self.accelerator.unwrap_model(self.wrapper).model
        path = save_checkpoint(self.accelerator, model, self.cfg.train.output_dir, self.progress, self._extra_files())
        if self.accelerator.is_main_process:
            prune_checkpoints(self.cfg.train.output_dir, self.cfg.train.save_total_limit, self.progress.best_step)
        return path

    def save(self) -> Path:
        """Write the final adapter (or full model) into output_dir, file by file atomically."""
        acc = self.accelerator
        out = Path(self.cfg.train.output_dir)
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.wrapper).model
        state = gathered_state_dict(model)
        if acc.is_main_process:
            tmp = out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if getattr(self, "initial_adapter", None):  # PiSSA/OLoRA: the equivalent plain LoRA (rank 2r)
                self.initial_adapter.save_converted(model, tmp)
            else:
                save_pretrained(model, tmp, state)
            # The trained template as the folder's own chat template: vLLM and transformers users
            # render the prompt the adapter learned.
            save_tokenizer(self.tokenizer, self.template, tmp)
            for name, text in self._extra_files().items():
                (tmp / name).write_text(text, encoding="utf-8")
            for f in tmp.iterdir():
                target = out / f.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(f, target)
            tmp.rmdir()
        acc.wait_for_everyone()
        return out


def run_training(cfg: TrainConfig, callbacks: list[StepCallback] | None = None, progress_bar: bool = True) -> Trainer:
    """setup -> train -> save; returns the trainer (history, data stats, paths)."""
    trainer = Trainer(cfg, callbacks, progress_bar).setup()
    if cfg.train.output_dir and trainer.accelerator.is_main_process:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        cfg.save(Path(cfg.train.output_dir) / "run_config.yaml")
    trainer.train()
    return trainer
