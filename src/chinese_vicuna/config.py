"""Typed configuration: the single source of truth for every command.

Each dataclass field is a config key. YAML presets and ``--key value`` flags use the same
flat names (``lora_r``, ``data_path``...), and the resolved config is written as
``run_config.yaml`` next to every checkpoint, so a run can always be reproduced.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .stages import STAGES, StageName, get_stage


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says which key and what was expected."""


@dataclass
class ModelArgs:
    base_model: str | None = None
    """HF model folder, hub id or ``.gguf`` file. Default: the embedded SmolLM2-135M-Instruct."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the frozen base weights with bitsandbytes: ``4bit`` = QLoRA (NF4, double quant)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype (autocast). ``auto``: bf16 on GPUs and CPUs with native bf16 (AVX512-BF16/AMX), else
    fp16 on older GPUs and fp32 on other CPUs. ``float32`` forces full precision."""
    attn_implementation: str = "auto"
    """Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``, ``lowmem_eager``). ``auto``: sdpa on GPU;
    for CPU training ``lowmem_eager`` (with fast_kernels; else eager), measured faster there than the CPU
    flash kernel's backward at these lengths."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model folder."""
    rope_scaling: str | None = None
    """Stretch the context beyond the model's ``max_position_embeddings``: ``TYPE:FACTOR`` with TYPE one of
    transformers' ``linear``, ``dynamic`` (NTK) or ``yarn`` (e.g. ``linear:2`` doubles it). Needed when
    cutoff_len exceeds the model's context."""


@dataclass
class LoraArgs:
    finetuning: Literal["lora", "full"] = "lora"
    """``lora`` trains an adapter (QLoRA when quantization is set); ``full`` trains every weight."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt. Default: per architecture (q_proj, v_proj for LLaMA); ``all-linear`` = every
    linear layer but the output head (peft's choice)."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."""
    init_adapter: str | None = None
    """Start from this adapter's weights (continue-finetune, fresh optimizer)."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output row on top of the LoRA direction (peft ``use_dora``)."""
    use_rslora: bool = False
    """rank-stabilised LoRA: scale = alpha / sqrt(r) instead of alpha / r (peft ``use_rslora``)."""
    lora_init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """LoRA initialisation (peft ``init_lora_weights``): ``default`` (B = 0), ``gaussian``, ``pissa`` / ``olora``
    (start from the base's principal components / QR; the saved adapter is converted to a plain LoRA of rank
    2r for the original base), ``loftq`` (adapter fitted to the 4-bit quantization error; needs a CUDA GPU)."""
    pissa_niter: int = 0
    """PiSSA by randomized SVD with this many subspace iterations (peft ``pissa_niter_N``); 0 = exact SVD."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+: LoRA's B matrices train at learning_rate * ratio (16 in the paper); 0 = off."""


@dataclass
class DataArgs:
    data_path: list[str] = field(default_factory=lambda: [])
    """Data files/folders/hub ids. ``PATH*W`` takes W times the records (0.5 = half, 2 = twice)."""
    format: Literal["auto", "alpaca", "vicuna-chat", "sharegpt", "openai", "text"] = "auto"
    """Record format; ``auto`` detects it per file from the first record."""
    template: str = "alpaca"
    """Prompt template: ``alpaca``, ``vicuna-chat`` or ``auto`` (the tokenizer's chat template)."""
    system_prompt: str | None = None
    """Overrides the template's default system text / header."""
    mask: Literal["assistant", "last", "none"] = "assistant"
    """Which tokens are trained: every reply, only the final reply, or everything."""
    cutoff_len: int = 256
    """Maximum tokens per sample (and block size for raw text)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Over-long samples: drop old history then shorten, keeping the final reply's EOS; or drop them."""
    val_size: float = 0.0
    """Validation split: a count (>= 1) or a fraction (< 1). 0 disables evaluation."""
    dedup: bool = True
    """Drop duplicate conversations (after format conversion)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """Bad records stop the run with file:line (``error``), or are skipped and written to a rejects file."""
    packing: bool = False
    """Pack several samples per row; attention stays inside each sample (position ids restart)."""
    group_by_length: bool = True
    """Batch samples of similar length together to cut padding."""
    max_samples: int | None = None
    """Use at most this many training records (after shuffling); for quick runs."""


@dataclass
class TrainArgs:
    output_dir: str = "outputs/run"
    """Where checkpoints, the final adapter, logs and loss.png go."""
    num_epochs: float = 3.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (overrides num_epochs when > 0)."""
    micro_batch_size: int = 4
    """Samples per forward pass on one device."""
    batch_size: int = 128
    """Samples per optimizer step across all devices; gradient accumulation makes up the rest."""
    learning_rate: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps (takes precedence over warmup_ratio when > 0)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    eval_steps: int = 200
    """Evaluate on the validation split every N steps (and at the end)."""
    save_steps: int = 200
    """Write a resumable checkpoint every N steps."""
    save_total_limit: int = 3
    """Keep at most this many recent checkpoints (the best one by validation loss is kept too)."""
    logging_steps: int = 10
    """Log loss, learning rate and tokens/s every N steps."""
    seed: int = 42
    """Seeds data order, LoRA init and dropout."""
    resume: str | None = None
    """``auto``/``latest`` (newest checkpoint in output_dir) or a checkpoint folder."""
    new_data: bool = False
    """With resume: keep optimizer and schedule but start the (new) data from its beginning."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers besides console and CSV: ``tensorboard``, ``wandb``, ``swanlab`` (offline log in output_dir unless
    SWANLAB_MODE / SWANLAB_API_KEY), ``mlflow`` (file store in output_dir unless MLFLOW_TRACKING_URI); ``none`` for neither."""
    loss_chunk_size: int = 256
    """Trained positions per cross-entropy chunk: full-vocabulary logits are never materialised at once."""
    num_threads: int = 0
    """CPU threads for torch (0 = torch's default)."""
    launcher: Literal["local", "ray"] = "local"
    """``local``: this process (under ``torchrun``/``accelerate launch`` for DDP, FSDP, DeepSpeed); ``ray``: Ray
    Train's TorchTrainer on num_workers workers of the cluster ``RAY_ADDRESS`` names (else a local one)."""
    num_workers: int = 2
    """Workers for ``launcher: ray`` (GPUs are used when the cluster has one per worker)."""
    gradient_checkpointing: str = "auto"
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant):
    ``true``, ``false``, or ``auto`` (on when ``chinese-vicuna plan`` predicts the run would not fit the device)."""
    cpu_allocator: Literal["auto", "jemalloc", "glibc"] = "auto"
    """The C allocator of a ``train`` process (it holds every CPU tensor). ``auto``: jemalloc where it is
    installed (Linux: ``apt-get install libjemalloc2``; ``make install`` does), else the C library's;
    ``jemalloc``: an error if it is missing; ``glibc``: the C library's. Under mixed sample lengths glibc's
    heap fragments (the demo run peaked 80% above its live tensors) and the memory plan cannot hold;
    jemalloc stays at the live size. ``train`` re-executes itself once with ``LD_PRELOAD`` to switch."""
    fast_kernels: bool = True
    """Swap in the trainer's kernels (low-memory eager attention, RMSNorm and SwiGLU that keep less for
    backward, faster LoRA dropout): the same maths as the stock modules. ``false`` trains the stock HF/PEFT modules."""


@dataclass
class PrefArgs:
    stage: StageName = "sft"
    """Training objective. ``sft``: replies given prompts; ``pretrain``: raw text (records with ``text``,
    ``.txt`` files); ``dpo``/``ipo``/``orpo``/``simpo``: chosen-vs-rejected pairs; ``kto``: replies labelled
    desirable or not (pairs are split into one of each); ``grpo``: online RL from prompts and reward functions
    (see the GRPO section)."""
    pref_beta: float = 0.1
    """beta of DPO/IPO/KTO (strength of the pull towards the reference), ORPO's odds-ratio weight (lambda)
    and SimPO's reward scale (the SimPO paper used 2.0-2.5)."""
    pref_loss_type: Literal["sigmoid", "hinge", "robust"] = "sigmoid"
    """DPO's loss: ``sigmoid`` (the paper's; with label_smoothing it is cDPO), ``hinge`` (SLiC), ``robust``
    (rDPO, unbiased under label noise = label_smoothing)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    label_smoothing: float = 0.0
    """Assumed fraction of flipped preference labels (DPO sigmoid/robust, SimPO); 0 to 0.5."""
    kto_desirable_weight: float = 1.0
    """KTO: weight of the losses of desirable replies."""
    kto_undesirable_weight: float = 1.0
    """KTO: weight of the losses of undesirable replies."""
    pref_ftx: float = 0.0
    """Adds pref_ftx x the SFT loss (mean per-token NLL) of the chosen/desirable reply (DPO, IPO, SimPO, KTO;
    ORPO always has it with weight 1)."""
    ref_adapter: str | None = None
    """Reference model of DPO/IPO/KTO: the base with this adapter (e.g. the SFT adapter you start from with
    init_adapter). Default: the base model (the trained adapter disabled), no second copy in memory."""


@dataclass
class GRPOArgs:
    num_generations: int = 4
    """GRPO: completions sampled per prompt (the group whose rewards are compared). With ``stage: grpo``,
    batch_size and micro_batch_size count prompts: a micro-batch generates and trains micro_batch_size x
    num_generations completions (TRL's per_device_train_batch_size counts completions)."""
    max_new_tokens: int = 128
    """GRPO: the longest completion, in tokens (TRL's max_completion_length)."""
    temperature: float = 1.0
    """GRPO: sampling temperature of the completions."""
    top_p: float = 1.0
    """GRPO: nucleus sampling of the completions (1 = off)."""
    reward_funcs: list[str] = field(default_factory=lambda: ["match"])
    """GRPO reward functions, summed with reward_weights: ``match`` (the completion's final answer equals the
    record's ``answer``: 1 or 0), ``format:REGEX`` (1 if the regex is found in the completion, ``re.search``
    with DOTALL: anchor it with ``^``/``$``), ``length`` or ``length:N`` (0 up to N tokens, then falling
    linearly to -1 at max_new_tokens; N defaults to max_new_tokens // 2), or a user function
    ``module:function`` / ``path/to/file.py:function`` with TRL's signature ``f(prompts, completions,
    completion_ids, **record_fields) -> list[float | None]``."""
    reward_weights: list[float] | None = None
    """GRPO: one weight per reward function (default: 1 each)."""
    grpo_loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """GRPO loss, as TRL's GRPOTrainer: ``grpo`` (advantages divided by the group's std; each completion's
    token mean, averaged over completions), ``dr_grpo`` (Dr. GRPO: no std scaling; token sums divided by
    max_new_tokens), ``dapo`` (token-level mean over the step's completion tokens; use epsilon_high 0.28)."""
    epsilon_low: float = 0.2
    """GRPO: the importance ratio is clipped below at 1 - epsilon_low."""
    epsilon_high: float | None = None
    """GRPO: ... and above at 1 + epsilon_high (DAPO's clip-higher); default: epsilon_low."""
    beta: float = 0.0
    """GRPO: weight of the KL penalty to the reference (the base with the adapter disabled; k3 estimator).
    0, as current practice (DAPO, Dr. GRPO, TRL's default): no reference forward at all."""
    num_iterations: int = 1
    """GRPO: optimizer steps per generation (mu): the same completions train this many steps with the
    importance ratio against the sampling policy clipped; each data batch then lasts num_iterations steps."""
    dynamic_sampling: bool = False
    """GRPO: drop groups whose rewards are all equal (zero advantage) from the loss and its normaliser
    (DAPO's dynamic sampling, without re-sampling to refill the batch)."""


CONFIG_CLASSES = (ModelArgs, LoraArgs, DataArgs, TrainArgs, PrefArgs, GRPOArgs)


@dataclass
class TrainConfig:
    """Everything ``chinese-vicuna train`` needs, grouped as in the design."""

    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    pref: PrefArgs = field(default_factory=PrefArgs)
    grpo: GRPOArgs = field(default_factory=GRPOArgs)

    def flat(self) -> dict[str, Any]:
        """All keys in one flat mapping, as in YAML and on the command line."""
        out: dict[str, Any] = {}
        for group in (self.model, self.lora, self.data, self.train, self.pref, self.grpo):
            out.update(dataclasses.asdict(group))
        return out

    def to_yaml(self) -> str:
        """The resolved config as the YAML that ``load_config`` reads back."""
        return yaml.safe_dump(self.flat(), allow_unicode=True, sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml(), encoding="utf-8")
        os.replace(tmp, path)


def config_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every config key -> (its group: model, lora, data, train, pref or grpo; its dataclass field, type resolved)."""
    groups = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "train": TrainArgs, "pref": PrefArgs,
              "grpo": GRPOArgs}
    table: dict[str, tuple[str, dataclasses.Field]] = {}
    for group, cls in groups.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            f.type = hints[f.name]
            table[f.name] = (group, f)
    return table


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or string value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        # `--lora_target_modules q_proj,v_proj` and repeated flags both give a flat list
        # (YAML numbers, e.g. reward_weights: [1.0, 0.5], stay numbers)
        flat = [p.strip() if isinstance(p, str) else p for v in value for p in (v.split(",") if isinstance(v, str) else [v])]
        return [_coerce(key, v, args[0]) for v in flat if v != ""]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        try:
            number = float(value) if tp is float else int(str(value).replace("_", ""))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown(key: str, known: typing.Iterable[str]) -> ConfigError:
    hint = difflib.get_close_matches(key, list(known), n=1)
    return ConfigError(f"unknown config key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Turn ``--key value``/``--key=value``/``--flag`` into raw values; list keys may repeat."""
    table = config_fields()
    raw: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are written --key value")
        key, _, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in table:
            raise _unknown(key, table)
        if not _:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                if table[key][1].type is not bool:
                    raise ConfigError(f"--{key}: a value is expected")
                value = "true"
            else:
                value = nxt
                i += 1
        i += 1
        if typing.get_origin(_strip_optional(table[key][1].type)) is list and key in raw:
            raw[key] = raw[key] + [value]
        elif typing.get_origin(_strip_optional(table[key][1].type)) is list:
            raw[key] = [value]
        else:
            raw[key] = value
    return raw


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0]
    return tp


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a TrainConfig from an optional YAML file plus ``--key value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, unreadable YAML.
    """
    table = config_fields()
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys")
        for key, value in loaded.items():
            if key not in table:
                raise ConfigError(f"{p}: {_unknown(key, table)}")
            values[key] = value
    for key, value in parse_overrides(overrides or []).items():
        values[key] = value
    cfg = TrainConfig()
    for key, value in values.items():
        group, f = table[key]
        setattr(getattr(cfg, group), key, _coerce(key, value, f.type))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks with messages that name the keys."""
    t, d, lo = cfg.train, cfg.data, cfg.lora
    if t.micro_batch_size < 1 or t.batch_size < 1:
        raise ConfigError("micro_batch_size and batch_size must be >= 1")
    if t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"batch_size ({t.batch_size}) must be a multiple of micro_batch_size ({t.micro_batch_size})"
        )
    if d.cutoff_len < 8:
        raise ConfigError(f"cutoff_len: expected >= 8, got {d.cutoff_len}")
    if d.val_size < 0:
        raise ConfigError(f"val_size: expected >= 0, got {d.val_size}")
    if lo.finetuning == "full" and cfg.model.quantization != "none":
        raise ConfigError("finetuning: full cannot train quantized weights; use quantization: none")
    pr = cfg.pref
    stage = get_stage(pr.stage)
    if not stage.packable and d.packing:
        why = "completions are scored as whole sequences" if stage.objective == "grpo" else "pairs are compared as whole sequences"
        raise ConfigError(f"packing: not supported with stage {pr.stage} ({why})")
    if not 0 <= pr.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing: expected 0 <= value < 0.5, got {pr.label_smoothing}")
    if pr.pref_beta <= 0:
        raise ConfigError(f"pref_beta: expected > 0, got {pr.pref_beta}")
    if pr.ref_adapter and not stage.needs_reference:
        *rest, last = [s.name for s in STAGES.values() if s.needs_reference]
        with_ref = f"{', '.join(rest)} and {last}"
        raise ConfigError(f"ref_adapter: only {with_ref} use a reference model, not stage {pr.stage}")
    if pr.ref_adapter and lo.lora_init in ("pissa", "olora"):
        raise ConfigError(f"ref_adapter: cannot be loaded onto the residual base that lora_init: {lo.lora_init} trains; "
                          "leave ref_adapter unset (the reference is then the original model)")
    if pr.ref_adapter and lo.finetuning != "lora":
        raise ConfigError("ref_adapter: needs finetuning: lora (the reference is the base with that adapter)")
    _validate_grpo(cfg)
    t.gradient_checkpointing = str(t.gradient_checkpointing).lower()
    if t.gradient_checkpointing not in ("auto", "true", "false"):
        raise ConfigError(f"gradient_checkpointing: expected auto, true or false, got {t.gradient_checkpointing!r}")
    if cfg.model.rope_scaling is not None:
        parse_rope_scaling(cfg.model.rope_scaling)
    if lo.lora_init in ("pissa", "olora", "loftq") and cfg.model.quantization != "none":
        raise ConfigError(f"lora_init: {lo.lora_init} initialises from the full-precision base weights; "
                          "use quantization: none")
    if t.new_data and not t.resume:
        raise ConfigError("new_data needs resume: it continues a run's optimizer on new data")


def _validate_grpo(cfg: TrainConfig) -> None:
    g = cfg.grpo
    if g.num_generations < 2:
        raise ConfigError(f"num_generations: expected >= 2 (advantages compare completions of one prompt), got {g.num_generations}")
    if g.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected >= 1, got {g.max_new_tokens}")
    if g.temperature <= 0:
        raise ConfigError(f"temperature: expected > 0 (GRPO samples), got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"top_p: expected 0 < top_p <= 1, got {g.top_p}")
    if not g.reward_funcs:
        raise ConfigError("reward_funcs: give at least one reward function")
    if g.reward_weights is not None and len(g.reward_weights) != len(g.reward_funcs):
        raise ConfigError(f"reward_weights: expected {len(g.reward_funcs)} weights (one per reward_funcs entry), "
                          f"got {len(g.reward_weights)}")
    if g.epsilon_low < 0 or (g.epsilon_high is not None and g.epsilon_high < 0):
        raise ConfigError("epsilon_low/epsilon_high: expected >= 0")
    if g.beta < 0:
        raise ConfigError(f"beta: expected >= 0, got {g.beta}")
    if g.num_iterations < 1:
        raise ConfigError(f"num_iterations: expected >= 1, got {g.num_iterations}")
    if cfg.pref.stage == "grpo" and g.beta > 0:
        if cfg.lora.finetuning != "lora":
            raise ConfigError("beta: the KL reference is the base with the adapter disabled; it needs finetuning: lora")
        if cfg.lora.lora_init in ("pissa", "olora"):
            raise ConfigError(f"beta: with lora_init: {cfg.lora.lora_init} the adapter-disabled model is not the "
                              "original one; use beta: 0 or another lora_init")


ROPE_TYPES = ("linear", "dynamic", "yarn")


def parse_rope_scaling(spec: str) -> tuple[str, float]:
    """``"linear:2"`` -> ``("linear", 2.0)``; the types are transformers' names (``dynamic`` = NTK-aware).

    Raises:
        ConfigError: not ``TYPE:FACTOR`` with a known type and a factor > 1.
    """
    kind, _, factor = str(spec).partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = 0.0
    if kind not in ROPE_TYPES or value <= 1.0:
        raise ConfigError(
            f"rope_scaling: expected TYPE:FACTOR with TYPE one of {', '.join(ROPE_TYPES)} and FACTOR > 1 "
            f"(e.g. linear:2), got {spec!r}"
        )
    return kind, value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows it), by name."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = nxt.value.value  # type: ignore[attr-defined]
    return docs


def field_help() -> list[tuple[str, str, str]]:
    """(key, default, docstring) for every config key, for --help and the README."""
    rows = []
    for cls in CONFIG_CLASSES:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((f.name, repr(default), docs.get(f.name, "")))
    return rows
