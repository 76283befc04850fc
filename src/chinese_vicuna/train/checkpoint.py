"""Atomic checkpoints and exact resume.

A checkpoint folder holds the adapter (plain PEFT files, so a checkpoint is itself a usable
adapter), and, through ``accelerate.save_state``, the optimizer, the scheduler, the RNG states
of every process and the loop's progress (step, data offset, best validation loss). accelerate
handles the engine-specific parts (DDP, DeepSpeed ZeRO, FSDP shards).

Writes go to ``checkpoint-N.tmp`` and are renamed to ``checkpoint-N`` only when complete, so a
kill during a save leaves the previous checkpoint intact; leftover ``.tmp`` folders are ignored
and removed at the next start.

A transformers ``Trainer`` checkpoint (what the seed projects' scripts write and
Chinese-Vicuna's ``finetune_others_continue`` resumes from: adapter weights, ``optimizer.pt``,
``scheduler.pt``, a ``trainer_state.json`` with ``global_step``) is accepted as ``resume`` too:
its adapter weights, AdamW moments and step are carried over onto our optimizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ConfigError

DONE_FILE = "trainer_state.json"
# Where a Trainer checkpoint keeps the adapter: peft's files, or (Chinese-Vicuna's finetune.py, which
# overrode state_dict with the adapter's) the model file of a plain Trainer save.
TRAINER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")


@dataclass
class Progress:
    """The loop's position, saved with every checkpoint (accelerate custom object)."""

    step: int = 0
    data_offset: int = 0
    """Step at which the current data started (``--new-data`` restarts the data there)."""
    best_val: float | None = None
    best_step: int | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / DONE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume(output_dir: str, resume: str) -> Path:
    """``auto``/``latest`` -> newest complete checkpoint in output_dir, else the given folder."""
    if resume in ("auto", "latest", "true", "True"):
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise FileNotFoundError(f"{output_dir}: no complete checkpoint to resume from")
        return ckpts[-1]
    p = Path(resume)
    if not (p / DONE_FILE).exists():
        raise FileNotFoundError(f"{resume}: not a complete checkpoint (no {DONE_FILE})")
    return p


def _state(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / DONE_FILE).read_text(encoding="utf-8"))


def is_trainer_checkpoint(folder: str | os.PathLike) -> bool:
    """A transformers ``Trainer`` checkpoint (its trainer_state.json has ``global_step``; ours has ``step``)."""
    state = _state(folder)
    return "global_step" in state and "step" not in state


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint (ours or a ``Trainer``'s) was written at."""
    state = _state(folder)
    return int(state["step"] if "step" in state else state["global_step"])


def clean_partial(output_dir: str | os.PathLike) -> None:
    """Remove ``*.tmp`` folders left by a save that was killed."""
    d = Path(output_dir)
    if d.is_dir():
        for p in d.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def gathered_state_dict(model) -> dict | None:
    """The trainable weights as whole CPU tensors when FSDP2 shards them (DTensor parameters), else None.

    ``save_pretrained`` cannot read a DTensor's storage ("invalid python storage"); torch's
    ``get_model_state_dict`` gathers the shards. A collective: every process must call it.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def save_pretrained(model, folder: Path, state_dict: dict | None) -> None:
    """``model.save_pretrained``, from ``state_dict`` (``gathered_state_dict``'s) when there is one."""
    model.save_pretrained(str(folder), **({"state_dict": state_dict} if state_dict is not None else {}))


def save_checkpoint(accelerator, model, output_dir: str, progress: Progress, extra_files: dict[str, str]) -> Path:
    """Write ``checkpoint-{step}`` atomically. Every process must call this.

    Args:
        accelerator: the run's Accelerator (its save hooks drop frozen base weights).
        model: the unwrapped (PEFT) model; its adapter is saved with ``save_pretrained``.
        output_dir: the run folder.
        progress: loop position, already updated to the step just finished.
        extra_files: name -> text written into the folder (run_config.yaml, chinese_vicuna.json).
    """
    final = Path(output_dir) / f"checkpoint-{progress.step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    state = gathered_state_dict(model) if hasattr(model, "peft_config") else None
    if accelerator.is_main_process:
        if hasattr(model, "peft_config"):
            save_pretrained(model, tmp, state)
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / DONE_FILE).write_text(json.dumps(progress.state_dict(), indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str, keep: int, best_step: int | None) -> None:
    """Keep the ``keep`` newest checkpoints and the best one."""
    ckpts = list_checkpoints(output_dir)
    if keep <= 0:
        return
    for p in ckpts[:-keep]:
        if best_step is not None and p.name == f"checkpoint-{best_step}":
            continue
        shutil.rmtree(p, ignore_errors=True)


def load_adapter_weights(model, folder: Path, names: tuple[str, ...] = ("adapter_model.safetensors",)) -> None:
    """Copy a checkpoint's adapter weights into the live PEFT model (every LoRA weight must match)."""
    from ..model.adapters import load_state, read_adapter_state

    hint = "train with the LoRA settings of the run that wrote it (lora_r, lora_target_modules, modules_to_save)"
    load_state(model, read_adapter_state(folder, names), folder, model.active_adapter, hint=hint)


def _decay_names(model) -> set[str]:
    """The parameters the ``Trainer`` puts in its weight-decay group (its ``get_decay_parameter_names``)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def load_trainer_optimizer(optimizer, model, path: Path) -> int:
    """Put a ``Trainer``'s AdamW moments (``optimizer.pt``) onto our optimizer's parameters.

    The Trainer orders its parameters as: weight-decay group (``named_parameters`` order), then the
    no-decay group; ``optimizer.pt`` stores them by that index, without names. The order is rebuilt
    from our model (the same PEFT model, so the same names), and every moment's shape is checked.
    Returns the number of parameters whose state was restored.
    """
    import torch

    if not path.exists():
        raise FileNotFoundError(f"{path}: missing: the Trainer checkpoint has no optimizer state to continue from")
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
        groups, state = saved["param_groups"], saved["state"]
    except Exception as e:  # not a torch optimizer state dict
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not an optimizer state ({reason})") from None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(groups) == 1:
        order = named
    else:
        decay = _decay_names(model)
        order = [(n, p) for n, p in named if n in decay] + [(n, p) for n, p in named if n not in decay]
    saved_ids = [i for g in groups for i in g["params"]]
    sizes = [len(g["params"]) for g in groups]
    want = [len(named)] if len(groups) == 1 else [sum(n in decay for n, _ in named), sum(n not in decay for n, _ in named)]
    if sizes != want:
        raise ConfigError(
            f"{path}: optimizer state for {sum(sizes)} parameters in groups of {sizes}, but this model trains "
            f"{len(named)} ({want}): train with the same LoRA settings (lora_r, lora_target_modules, "
            "modules_to_save) as the run that wrote the checkpoint"
        )
    ours = [p for g in optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(ours)}
    moved = {}
    for saved_id, (name, p) in zip(saved_ids, order, strict=True):
        moments = state.get(saved_id)
        if moments is None:
            continue  # never updated (no gradient yet)
        for key, value in moments.items():
            if key != "step" and torch.is_tensor(value) and value.shape != p.shape:
                raise ConfigError(f"{path}: {key} of {name} is {tuple(value.shape)}, the parameter is {tuple(p.shape)}")
        moved[index[id(p)]] = moments
    current = optimizer.state_dict()
    current["state"] = moved
    optimizer.load_state_dict(current)  # our hyperparameters, the checkpoint's moments
    return len(moved)


def resume_trainer_checkpoint(model, optimizer, scheduler, folder: Path) -> int:
    """Continue from a ``Trainer`` checkpoint: adapter weights, AdamW state and the step. Returns the step.

    The learning-rate schedule is this run's (its config), advanced to the checkpoint's step. The
    Trainer's RNG state is not restored: our data order is a function of the step, not of an RNG.
    """
    import warnings

    if not hasattr(model, "peft_config"):
        raise ConfigError(f"{folder}: resuming a Trainer checkpoint needs finetuning: lora (it holds an adapter)")
    load_adapter_weights(model, folder, TRAINER_WEIGHTS)
    load_trainer_optimizer(optimizer, model, folder / "optimizer.pt")
    step = checkpoint_step(folder)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        for _ in range(step):
            scheduler.step()
    return step
