"""LoRA variants peft implements: DoRA, rsLoRA, PiSSA/OLoRA/Gaussian/LoftQ initialisation, LoRA+.

Everything here maps our config keys onto peft's own options; the maths is peft's:

* ``use_dora``, ``use_rslora`` -> ``LoraConfig(use_dora=..., use_rslora=...)``;
* ``lora_init`` -> ``LoraConfig(init_lora_weights=True | "gaussian" | "pissa" | "pissa_niter_N" |
  "olora" | "loftq")`` (LoftQ with a ``LoftQConfig``);
* ``loraplus_lr_ratio`` -> ``peft.optimizers.create_loraplus_optimizer`` (lora_B, and 1-D
  parameters such as DoRA magnitudes, at ``lr * ratio``).

PiSSA and OLoRA move the adapter's initial product out of the base weights (``W_res = W - s B0 A0``)
so the trained adapter only fits that residual base. The initial adapter is saved at setup and
the final adapter is written through peft's ``path_initial_model_for_weight_conversion`` as the
equivalent plain LoRA of twice the rank (``[B | -B0] [A ; A0]``), which any peft user loads on the
original base. Checkpoints keep the training form (rank ``r``, ``init_lora_weights`` recorded):
resuming re-runs the same deterministic initialisation on the original base and loads ``A``/``B``.

LoftQ (peft 0.21 runs it on CUDA only) fits the adapter to the base's 4-bit quantization error and
replaces the base weights by their dequantized 4-bit copy; the adapter records ``init_lora_weights:
loftq``, so peft's loading redoes that replacement. Not exercised on a CPU-only machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
# initialisations that change the base weights (the adapter is converted to plain LoRA on save)
MUTATING_INITS = ("pissa", "olora")
INITIAL_ADAPTER = "initial_adapter"  # peft loads it under its folder name: no "." allowed


def init_lora_weights(lora_init: str = "default", pissa_niter: int = 0) -> bool | str:
    """Our ``lora_init`` (+ ``pissa_niter``) as peft's ``init_lora_weights`` value."""
    from ..config import ConfigError

    if lora_init not in LORA_INITS:
        raise ConfigError(f"lora_init: expected one of {', '.join(LORA_INITS)}, got {lora_init!r}")
    if pissa_niter < 0:
        raise ConfigError(f"pissa_niter: expected >= 0 (0 = full SVD), got {pissa_niter}")
    if lora_init == "default":
        return True
    if lora_init == "pissa" and pissa_niter:
        return f"pissa_niter_{pissa_niter}"  # randomized SVD, seeded by the run's seed
    return lora_init


def is_mutating(init: bool | str | None) -> bool:
    """True for peft ``init_lora_weights`` values that rewrite the base weights (PiSSA, OLoRA)."""
    return str(init).lower().startswith(MUTATING_INITS)


def rebuilds_base(init: bool | str | None) -> bool:
    """An adapter whose base is rewritten when peft loads it: PiSSA/OLoRA in training form, LoftQ
    (the base becomes its 4-bit dequantized copy). peft rebuilds that base on load; a weight-by-weight
    merge cannot."""
    return is_mutating(init) or str(init).lower() == "loftq"


def variant_kwargs(*, use_dora: bool = False, use_rslora: bool = False, lora_init: str = "default",
                   pissa_niter: int = 0) -> dict:  # fmt: skip
    """``LoraConfig`` keyword arguments for the variant, after checking the combination."""
    from ..config import ConfigError

    init = init_lora_weights(lora_init, pissa_niter)
    if pissa_niter and lora_init != "pissa":
        raise ConfigError(f"pissa_niter: only used with lora_init: pissa (got lora_init: {lora_init})")
    if use_dora and is_mutating(init):
        # the conversion to plain LoRA covers A and B, not the magnitude vector DoRA adds
        raise ConfigError(f"use_dora: cannot be combined with lora_init: {lora_init} (its adapter could not be "
                          "converted to a plain one for the original base); use one of the two")
    kwargs: dict = {"use_dora": bool(use_dora), "use_rslora": bool(use_rslora), "init_lora_weights": init}
    if init == "loftq":
        kwargs["loftq_config"] = _loftq_config()
    return kwargs


def _loftq_config():
    """peft's LoftQ config, or a clear error where peft's LoftQ cannot run.

    peft 0.21's ``loftq_init`` quantizes on ``cuda`` (hard-coded) with bitsandbytes, and its
    ``LoraConfig`` wants scipy: on a CPU-only machine LoftQ cannot initialise.
    """
    import importlib.util

    import torch
    from peft import LoftQConfig

    from ..config import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("lora_init: loftq needs a CUDA GPU (peft's LoftQ quantizes the base with bitsandbytes on "
                          "cuda); on this machine use lora_init: pissa or default")
    missing = [m for m in ("scipy", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"lora_init: loftq needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    return LoftQConfig(loftq_bits=4, loftq_iter=1)


class InitialAdapter:
    """A PiSSA/OLoRA adapter as initialised (before any step), in a temporary folder removed with this object.

    ``path`` is what peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` needs to
    write the trained adapter as plain LoRA.
    """

    def __init__(self, model):
        self._tmp = tempfile.TemporaryDirectory(prefix="chinese-vicuna-init-")
        self.path = str(Path(self._tmp.name) / INITIAL_ADAPTER)
        model.save_pretrained(self.path)

    def save_converted(self, model, folder: str | os.PathLike) -> None:
        """Save ``model``'s trained adapter as the equivalent plain LoRA (rank 2r) for the original base."""
        import warnings

        with warnings.catch_warnings():
            # peft warns that a PiSSA/OLoRA adapter should be converted while it loads the initial one to do so
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
            model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=self.path)


def keep_initial_adapter(model, main_process: bool = True) -> InitialAdapter | None:
    """The initial adapter of a PiSSA/OLoRA model (saved by the main process only), else None."""
    cfg = getattr(model, "peft_config", {}).get("default")
    if not main_process or cfg is None or not is_mutating(cfg.init_lora_weights):
        return None
    return InitialAdapter(model)


def make_optimizer(model, params: list, *, lr: float, weight_decay: float, loraplus_lr_ratio: float = 0.0):
    """AdamW over ``params``; with ``loraplus_lr_ratio`` peft's LoRA+ grouping (B matrices at ``lr * ratio``).

    LoRA on embedding layers keeps ``lr`` (peft's default for them is 1e-6); full ``modules_to_save``
    copies train at ``lr``.
    """
    import torch

    from ..config import ConfigError

    if not loraplus_lr_ratio:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if loraplus_lr_ratio < 1:
        raise ConfigError(f"loraplus_lr_ratio: expected >= 1 (LoRA+ trains B faster than A), got {loraplus_lr_ratio}")
    if not hasattr(model, "peft_config"):
        raise ConfigError("loraplus_lr_ratio: needs finetuning: lora (it sets the learning rate of LoRA's B matrices)")
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                     loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lr)  # fmt: skip
