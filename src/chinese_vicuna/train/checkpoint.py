"""Atomic checkpoints and exact resume.

A checkpoint folder holds the adapter (plain PEFT files, so a checkpoint is itself a usable
adapter), and, through ``accelerate.save_state``, the optimizer, the scheduler, the RNG states
of every process and the loop's progress (step, data offset, best validation loss). accelerate
handles the engine-specific parts (DDP, DeepSpeed ZeRO, FSDP shards).

Writes go to ``checkpoint-N.tmp`` and are renamed to ``checkpoint-N`` only when complete, so a
kill during a save leaves the previous checkpoint intact; leftover ``.tmp`` folders are ignored
and removed at the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

DONE_FILE = "trainer_state.json"


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


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint was written at."""
    return int(json.loads((Path(folder) / DONE_FILE).read_text(encoding="utf-8"))["step"])


def clean_partial(output_dir: str | os.PathLike) -> None:
    """Remove ``*.tmp`` folders left by a save that was killed."""
    d = Path(output_dir)
    if d.is_dir():
        for p in d.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


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
    if accelerator.is_main_process:
        if hasattr(model, "peft_config"):
            model.save_pretrained(str(tmp))
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


def load_adapter_weights(model, folder: Path) -> None:
    """Copy a checkpoint's adapter weights into the live PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{folder}: adapter does not match the model: {result.unexpected_keys[:5]}")
