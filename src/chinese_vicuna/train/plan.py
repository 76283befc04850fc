"""``chinese-vicuna plan CONFIG.yaml [--key value ...]``: will this training run fit, and how much does it need?

The planner reads exactly what ``train`` reads (the same config and flags), but loads only the model
config (never the weights) and the tokenized data lengths, and adds up the memory of a training
step from the model's shapes:

- frozen weights by storage (fp32, bf16/fp16, bitsandbytes 8-bit, NF4 4-bit with double quantization);
- trainable parameters, their fp32 gradients and AdamW's two fp32 moments;
- activations kept for backward, per decoder layer and token, for the attention kernel in use
  (eager kernels keep ``heads x seq`` probabilities per token; sdpa/flash keep none), or only the
  layer inputs plus one recomputed layer with gradient checkpointing;
- the fused loss's logits chunk (``loss_chunk_size x vocab`` in fp32, with its gradient);
- framework overhead: on the CPU the process's resident size before the model (Python, torch,
  transformers, the tokenizer), on CUDA the CUDA context plus the caching allocator's slack.

The coefficients that are not pure arithmetic (overhead, allocator slack, backward workspace)
were measured with ``benchmarks/bench_plan.py`` against the trainer's own peak; the README lists the
accuracy. No library does this for our trainer (accelerate's ``estimate-memory`` counts weights
and Adam only, without activations), so it is written here.

The last line printed is always ``predicted peak: N MiB`` (on the CPU: the training process's peak
RSS; on CUDA: peak reserved memory plus the CUDA context).
"""

from __future__ import annotations

import argparse
import re
import resource
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import ConfigError, TrainConfig

MIB = 2**20

# Shapes of the models the presets name, for planning without the model folder (the table in the
# README is built from these). LLaMA-1 7B/13B/33B/65B as published by Meta.
KNOWN_SHAPES = {
    "llama-7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, context=2048),
    "llama-13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000, context=2048),
    "llama-33b": dict(hidden=6656, intermediate=17920, layers=60, heads=52, kv_heads=52, vocab=32000, context=2048),
    "llama-65b": dict(hidden=8192, intermediate=22016, layers=80, heads=64, kv_heads=64, vocab=32000, context=2048),
}

# The resident size of a training process before the model is loaded (Python, torch, transformers, peft,
# accelerate, the tokenizer): measured 412 MiB on the CPU with jemalloc and with glibc.
CPU_BASE_MIB = 410
# Kept activations are exactly the tensors counted below on the CPU (a test compares them with what autograd
# saves, layer by layer) and 7% under them on CUDA (fitted to an H200's peaks: benchmarks/results/plan*-cuda.json).
# A layer's backward needs, at once, about three fp32 buffers the size of its attention probabilities (their
# gradient and the softmax backward's): 12 bytes per probability, fitted in fp32 on an AVX2 CPU (3x the 4-byte
# probabilities) and under 16-bit autocast on an AVX512-BF16 CPU (5.7x the 2-byte ones); twice that with a
# k-bit base under autocast. bitsandbytes'
# 8-bit matmul keeps about 5 bytes per element of each layer's distinct linear inputs (measured: LLaMA-7B's
# shape at 1,024 and 4,096 tokens, without checkpointing, and with the non-reentrant checkpointing that could
# not free them).
ACTIVATION_FACTOR = 1.0
ACTIVATION_FACTOR_CUDA = 0.93
ATTENTION_BACKWARD = 5.7
ATTENTION_BACKWARD_FP32 = 3.0
INT8_KEPT_BYTES = 5.0
# CUDA: the context (kernels, cuBLAS workspace) and the caching allocator's rounding/fragmentation of what
# training allocates (the weights are a few large blocks, loaded once).
CUDA_CONTEXT_MIB = 500
CUDA_ALLOCATOR_SLACK = 1.10


@dataclass
class Shape:
    """What memory depends on: a decoder-only transformer's sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    head_dim: int = 0
    tied: bool = False
    model_type: str = "llama"
    source: str = ""
    file_bytes: int = 0
    """Size of the weight files (0: unknown, taken as 16-bit)."""

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        head = 0 if self.tied else self.embed_params()
        norms = (2 * self.layers + 1) * self.hidden
        return self.embed_params() + head + self.layers * self.layer_linear_params() + norms


def shape_from_config(config, source: str = "") -> Shape:
    text = getattr(config, "get_text_config", lambda: config)()
    return Shape(
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        vocab=text.vocab_size,
        context=int(getattr(text, "max_position_embeddings", 0) or 0),
        head_dim=getattr(text, "head_dim", None) or 0,
        tied=bool(getattr(text, "tie_word_embeddings", False)),
        model_type=getattr(text, "model_type", "llama"),
        source=source,
    )


def known_shape(name: str) -> Shape | None:
    """The built-in LLaMA shape a model name refers to (``.../llama-7b-hf`` -> LLaMA-7B), if any."""
    m = re.search(r"llama[-_]?(7|13|30|33|65)b", name.lower())
    if not m:
        return None
    size = {"30": "33"}.get(m.group(1), m.group(1))
    spec = KNOWN_SHAPES[f"llama-{size}b"]
    return Shape(**spec, source=f"LLaMA-{size}B (built-in shape)")


def model_config(cfg: TrainConfig):
    """The base model's transformers config (no weights), with ``rope_scaling`` applied and the
    context checked against ``cutoff_len``. Returns ``(config or None, Shape)``.

    A hub id that is neither cached nor reachable falls back to the built-in LLaMA shapes.

    Raises:
        ConfigError: cutoff_len exceeds the model's (scaled) context.
        ModelLoadError: the model folder has no readable config and no built-in shape matches.
    """
    from transformers import AutoConfig

    from ..model.load import ModelLoadError, check_context, looks_like_hub_id, resolve_base_model

    name = cfg.model.base_model
    config = None
    if name and looks_like_hub_id(name):
        shape = known_shape(name)
        try:  # config.json only: the planner never downloads weights (nor asks the hub for a known shape)
            config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code,
                                                local_files_only=shape is not None)
        except Exception:
            if shape is None:
                raise ModelLoadError(
                    f"{name}: its config.json is neither cached nor reachable, and it is not a known LLaMA size; "
                    "pass a local model folder"
                ) from None
            context = shape.context * (_factor(cfg.model.rope_scaling) if cfg.model.rope_scaling else 1)
            if cfg.data.cutoff_len > context:
                raise ConfigError(
                    f"cutoff_len: {cfg.data.cutoff_len} exceeds {shape.source}'s context of {int(context)} tokens; "
                    "set rope_scaling or lower cutoff_len"
                ) from None
            shape.context = int(context)
            return None, shape
    else:
        path = resolve_base_model(name)
        p = Path(path)
        try:
            if p.suffix == ".gguf":
                config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
            else:
                config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read the model config: {str(e).splitlines()[0]}") from None
        name = path
    context = check_context(config, cfg.data.cutoff_len, cfg.model.rope_scaling)
    shape = shape_from_config(config, source=str(name))
    shape.context = context
    folder = Path(str(name))
    folder = folder.parent if folder.suffix == ".gguf" else folder
    if folder.is_dir():
        files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin")) or list(folder.glob("*.gguf"))
        shape.file_bytes = sum(f.stat().st_size for f in files)
    return config, shape


def _factor(spec: str) -> float:
    from ..model.load import parse_rope_scaling

    return parse_rope_scaling(spec)[1]


@dataclass
class Plan:
    """A breakdown in bytes; ``peak`` is what the device is predicted to need at its highest."""

    device: str
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checkpointing: bool = False
    tokens: int = 0
    seq: int = 0
    floor: float = 0.0
    """The peak of loading the model (CPU: checkpoint file mapped + weights built), if above training's."""

    @property
    def peak(self) -> float:
        return max(sum(self.parts.values()), self.floor)

    @property
    def peak_mib(self) -> int:
        return int(round(self.peak / MIB))


def _bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _targets(cfg: TrainConfig, shape: Shape) -> list[str]:
    from ..model.adapters import DEFAULT_TARGETS

    targets = cfg.lora.lora_target_modules or DEFAULT_TARGETS.get(shape.model_type, ["all-linear"])
    if "all-linear" in targets:
        return list(shape.linear_shapes())
    return [t for t in targets if t in shape.linear_shapes()]


# The four distinct inputs of a decoder layer's linear layers, and the modules that read each.
LINEAR_INPUTS = {"attention input": ("q_proj", "k_proj", "v_proj"), "attention output": ("o_proj",),
                 "MLP input": ("gate_proj", "up_proj"), "MLP down input": ("down_proj",)}


def kept_inputs(cfg: TrainConfig, shape: Shape, compute_bytes: int) -> float:
    """Bytes per token and layer that the linear layers keep of their inputs for backward.

    A frozen base weight needs only itself for the input's gradient, so its input is kept only where a
    weight that reads it trains: every weight in a full fine-tune (the input once); a LoRA A (the input
    once, shared by the modules that read it) when lora_dropout is 0; otherwise each LoRA module keeps its
    own dropped copy and the dropout's keep-mask (1 byte, or the compute dtype's 2 under 16-bit autocast:
    see train/kernels.py's FastDropout). bitsandbytes' 8-bit matmul keeps more (counted apart).
    """
    lin = shape.linear_shapes()
    targets = set(list(lin) if cfg.lora.finetuning == "full" else _targets(cfg, shape))
    dropout = cfg.lora.finetuning != "full" and cfg.lora.lora_dropout > 0
    if cfg.model.quantization != "none" and compute_bytes == 2:
        # A k-bit base under 16-bit autocast (its fp32 residual stream cast for every matmul) measured as if
        # every linear input were kept, plus each LoRA module's dropped copy: fitted to SmolLM2 and LLaMA-7B's
        # peaks on an H200 (benchmarks/results/plan*-cuda.json). In fp32 nothing is cast: counted as above.
        h, i = shape.hidden, shape.intermediate
        copies = sum(lin[m][0] for m in targets) if dropout else 0
        return (2 * h + shape.q_dim + i + copies) * compute_bytes
    mask_bytes = 1 if compute_bytes == 4 else compute_bytes
    total = 0.0
    for readers in LINEAR_INPUTS.values():
        mine = [m for m in readers if m in targets]
        if not mine:
            continue
        width = lin[mine[0]][0]
        total += width * ((compute_bytes + mask_bytes) * len(mine) if dropout else compute_bytes)
    return total


def _weights_and_state(cfg: TrainConfig, shape: Shape, weight_bytes: int) -> dict[str, float]:
    """Frozen (or trained) weights by storage, the trainable parameters, their gradients and AdamW state."""
    q, full, L = cfg.model.quantization, cfg.lora.finetuning == "full", shape.layers
    # bitsandbytes quantizes the decoder's linear layers; embeddings, norms and lm_head stay in the compute
    # dtype. NF4 with double quantization: 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks.
    linear = L * shape.layer_linear_params()
    other = shape.total_params() - linear
    # peft's k-bit preparation keeps the unquantized rest (embeddings, norms) in fp32.
    per_linear = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0 + 4 / shape.hidden}.get(q, weight_bytes)
    other_bytes = 4 if q != "none" else weight_bytes
    parts = {"weights (frozen)" if not full else "weights (trained, fp32)": linear * per_linear + other * other_bytes}
    # trainable parameters: LoRA A/B of each target module (fp32), modules_to_save copies
    if full:
        trainable = shape.total_params()
    else:
        r, lin = cfg.lora.lora_r, shape.linear_shapes()
        trainable = L * sum(r * (lin[t][0] + lin[t][1]) for t in _targets(cfg, shape))
        for m in cfg.lora.modules_to_save or []:
            if m in ("embed_tokens", "lm_head"):
                trainable += shape.embed_params()
        parts["LoRA parameters (fp32)"] = trainable * 4
    parts["gradients (fp32)"] = trainable * 4
    parts["AdamW state (fp32 x2)"] = trainable * 8
    return parts


def _activations(cfg: TrainConfig, shape: Shape, tokens: int, seq: int, checkpointing: bool, device: str,
                 attention: str, compute_bytes: int) -> dict[str, float]:
    """What the forward keeps for backward, the backward's largest transient and the fused loss's chunk."""
    q, full = cfg.model.quantization, cfg.lora.finetuning == "full"
    L, h, i = shape.layers, shape.hidden, shape.intermediate
    # per token and decoder layer: each norm's input (the residual stream, 2h; it is fp32 with a k-bit base,
    # whose embeddings and norms peft keeps in fp32) and its fp32 inverse RMS, q/k/v after RoPE (q + 2kv), gate
    # and up (2i, the SwiGLU's inputs), each LoRA A's output (r) and what the linear layers keep of their
    # inputs (kept_inputs). Eager kernels also keep the attention probabilities.
    resid_bytes = 4 if q != "none" else compute_bytes
    n_lora = 0 if full else len(_targets(cfg, shape))
    per_token = (2 * h * resid_bytes + 2 * 4
                 + (shape.q_dim + 2 * shape.kv_dim + 2 * i + n_lora * cfg.lora.lora_r) * compute_bytes
                 + kept_inputs(cfg, shape, compute_bytes))
    attn_probs = shape.heads * seq * compute_bytes if attention in ("eager", "lowmem_eager") else 0
    factor = ACTIVATION_FACTOR_CUDA if device == "cuda" else ACTIVATION_FACTOR
    one_layer = tokens * (per_token + attn_probs) * factor
    parts: dict[str, float] = {}
    if checkpointing:
        # only each layer's input is kept; backward recomputes one layer at a time
        parts["activations (checkpointed inputs)"] = L * tokens * h * resid_bytes
        parts["activations (one recomputed layer)"] = one_layer
    else:
        parts["activations (all layers)"] = L * one_layer
    if q == "8bit" and not checkpointing:
        # bitsandbytes' int8 matmul keeps its input on the autograd context (ctx.tensors / ctx.A): every
        # layer's distinct linear inputs stay until backward. (With checkpointing, which is reentrant for an
        # 8-bit base, the layers' forwards run without autograd and keep nothing.)
        parts["8-bit matmul inputs (kept by bitsandbytes)"] = L * tokens * (2 * h + shape.q_dim + i) * INT8_KEPT_BYTES
    # the largest transient of a layer's backward: the attention probabilities' gradient and softmax
    # backward (eager kernels), or the MLP's intermediate gradients. Under 16-bit autocast with a k-bit base,
    # the residual stream and the backward's transients are fp32: twice the workspace (measured: QLoRA at
    # 2048 tokens, with and without checkpointing).
    attn_backward = ATTENTION_BACKWARD_FP32 if compute_bytes == 4 else ATTENTION_BACKWARD * (2 if q != "none" else 1)
    parts["backward workspace"] = tokens * max(attn_backward * attn_probs, 3 * i * compute_bytes) + tokens * h * 4 * 2
    # the fused loss: final hidden states, one chunk of fp32 logits with its softmax and gradient
    chunk = min(cfg.train.loss_chunk_size or tokens, tokens)
    parts["logits chunk"] = chunk * shape.vocab * 4 * 3 + tokens * h * 4
    return parts


def estimate(
    cfg: TrainConfig,
    shape: Shape,
    *,
    micro_batch: int,
    seq: int,
    checkpointing: bool,
    device: str,
    attention: str,
    compute_bytes: int,
    weight_bytes: int,
    file_bytes: int = 0,
) -> Plan:
    """Memory of one training step at ``micro_batch`` rows of ``seq`` tokens (padded length)."""
    q = cfg.model.quantization
    plan = Plan(device=device, checkpointing=checkpointing, tokens=micro_batch * seq, seq=seq)
    file_bytes = file_bytes or shape.total_params() * 2
    parts = _weights_and_state(cfg, shape, weight_bytes)
    parts.update(_activations(cfg, shape, micro_batch * seq, seq, checkpointing, device, attention, compute_bytes))
    if device == "cuda":
        # the weights are a few large blocks, loaded once: the allocator's slack is in what training allocates
        parts = {k: v if k.startswith("weights") else v * CUDA_ALLOCATOR_SLACK for k, v in parts.items()}
        parts["CUDA context"] = CUDA_CONTEXT_MIB * MIB
    else:
        parts["framework overhead (process)"] = CPU_BASE_MIB * MIB
        model_bytes = shape.total_params() * weight_bytes
        if q != "none":
            # bitsandbytes quantizes on the CPU through a 16-bit copy; the allocator keeps the freed blocks
            parts["bitsandbytes quantization (CPU heap)"] = shape.total_params() * 2
            # while loading: its staging copy, about half of it resident at the peak
            model_bytes = shape.total_params() * 1
        elif abs(file_bytes - model_bytes) <= 0.01 * model_bytes:
            model_bytes = 0  # the file's dtype is the weights': transformers maps them from the file, no copy
        # loading maps the checkpoint file (its pages count as resident) while building the weights
        plan.floor = CPU_BASE_MIB * MIB + file_bytes + model_bytes
    plan.parts = parts
    return plan


@dataclass
class RunPlan:
    """The plan of a configured run, and how to vary it."""

    cfg: TrainConfig
    shape: Shape
    device: str
    attention: str
    compute_bytes: int
    weight_bytes: int
    micro_batch: int
    seq: int
    lengths_note: str
    file_bytes: int = 0

    def at(self, micro_batch: int | None = None, seq: int | None = None, checkpointing: bool | None = None) -> Plan:
        ckpt = self.cfg.train.gradient_checkpointing == "true" if checkpointing is None else checkpointing
        return estimate(
            self.cfg, self.shape, micro_batch=micro_batch or self.micro_batch, seq=seq or self.seq,
            checkpointing=ckpt, device=self.device, attention=self.attention,
            compute_bytes=self.compute_bytes, weight_bytes=self.weight_bytes, file_bytes=self.file_bytes,
        )

    def largest(self, budget: float, checkpointing: bool) -> tuple[int, int]:
        """(largest micro_batch_size at this cutoff, largest cutoff_len at this micro-batch) within ``budget``."""
        mb = 0
        while mb < 4096 and self.at(micro_batch=mb + 1, seq=self.seq, checkpointing=checkpointing).peak <= budget:
            mb += 1
        lo, hi = 0, max(self.shape.context, self.seq)
        while lo < hi:  # the peak grows with the length: bisect
            mid = (lo + hi + 1) // 2
            if self.at(micro_batch=self.cfg.train.micro_batch_size, seq=mid, checkpointing=checkpointing).peak <= budget:
                lo = mid
            else:
                hi = mid - 1
        return mb, lo


def plan_run(
    cfg: TrainConfig,
    shape: Shape,
    lengths: list[int] | None,
    *,
    device: str | None = None,
) -> RunPlan:
    """Plan ``cfg``'s run from the model shape and the tokenized sample lengths.

    The longest micro-batch is ``micro_batch_size`` rows padded to the longest sample (every row
    is ``cutoff_len`` with packing, or when ``lengths`` is unknown).
    """
    import torch

    from ..model.load import training_precision

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    full = cfg.lora.finetuning == "full"
    if device == "cuda" and cfg.model.dtype == "auto":
        mixed, load_dtype = ("bf16", "float32" if full else "bfloat16")
    else:
        mixed, load_dtype = training_precision(cfg.model.dtype, full)
    compute = {"bf16": 2, "fp16": 2}.get(mixed, 4)
    attention = cfg.model.attn_implementation
    if attention == "auto":
        attention = "sdpa" if device == "cuda" else ("lowmem_eager" if cfg.train.fast_kernels else "eager")
    if cfg.data.packing or not lengths:
        seq = cfg.data.cutoff_len
        note = "every row at cutoff_len" + ("" if cfg.data.packing else " (no data lengths)")
    else:
        seq = min(max(lengths), cfg.data.cutoff_len)
        note = f"longest sample {seq} tokens of {len(lengths)}"
    return RunPlan(cfg, shape, device, attention, compute, _bytes(load_dtype), cfg.train.micro_batch_size, seq, note,
                   shape.file_bytes)


def data_lengths(cfg: TrainConfig) -> list[int] | None:
    """Token counts of the training samples, through the trainer's own rendering (no model weights)."""
    from ..data.datasets import parse_source, prepare
    from ..data.templates import get_template
    from ..data.tokenize import Renderer
    from ..model.load import load_tokenizer, looks_like_hub_id, resolve_base_model

    d = cfg.data
    if not d.data_path:
        return None
    name = cfg.model.base_model
    if name and looks_like_hub_id(name):
        from transformers import AutoTokenizer

        try:  # only a cached tokenizer: without one every sample is taken at cutoff_len
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:
            return None
    else:
        tok = load_tokenizer(resolve_base_model(name), cfg.model.trust_remote_code)
    renderer = Renderer(tok, get_template(d.template, tok, d.system_prompt), d.cutoff_len, d.mask, d.overlong)
    data = prepare(renderer, [parse_source(s, d.format) for s in d.data_path], val_size=d.val_size,
                   seed=cfg.train.seed, dedup=d.dedup, on_bad_record=d.on_bad_record, max_samples=d.max_samples,
                   progress=False)
    return [len(s.input_ids) for s in data.train]


def device_memory(device: str) -> float:
    """Bytes the device offers: a GPU's total memory, or the machine's RAM on the CPU."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[1])
    import psutil

    return float(psutil.virtual_memory().total)


def parse_size(text: str) -> float:
    """``24GiB``, ``11GB``, ``8000MiB``, ``24G`` -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--device-memory: expected a size like 24GiB or 11GB, got {text!r}")
    unit = m.group(2).upper()
    base = 1000 if m.group(3).upper() == "B" and unit else 1024
    return float(m.group(1)) * base ** " KMGT".index(unit or " ")


def measured_peak_mib() -> float:
    """What the prediction is compared with: peak RSS on the CPU; on CUDA peak reserved + context."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_reserved() > 0:
        return torch.cuda.max_memory_reserved() / MIB + CUDA_CONTEXT_MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare_line(predicted_mib: float, device: str) -> str:
    """``memory: predicted N MiB, measured M MiB (+x%)``, with a warning past 25% (on the CPU under glibc's
    malloc, the reason and the fix instead)."""
    measured = measured_peak_mib()
    diff = (measured - predicted_mib) / max(predicted_mib, 1)
    line = f"memory: predicted peak {predicted_mib:.0f} MiB, measured {measured:.0f} MiB ({diff:+.0%})"
    if abs(diff) > 0.25:
        from .heap import loaded_allocator

        if diff > 0 and device == "cpu" and loaded_allocator() == "glibc":
            line += (" -- glibc's malloc fragments under mixed lengths: install jemalloc (Debian/Ubuntu: apt-get install "
                     "libjemalloc2) and keep cpu_allocator: auto for a peak near the plan")
        else:
            line += " -- warning: the plan is off by more than 25% (please report it with `chinese-vicuna plan`'s output)"
    return line


def needs_checkpointing(rp: RunPlan, budget: float | None = None) -> tuple[bool, Plan]:
    """``gradient_checkpointing: auto``: on when the run without it would not fit the device (or ``budget``)."""
    setting = rp.cfg.train.gradient_checkpointing
    if setting in ("true", "false"):
        on = setting == "true"
        return on, rp.at(checkpointing=on)
    without = rp.at(checkpointing=False)
    if without.peak <= 0.9 * (budget or device_memory(rp.device)):
        return False, without
    return True, rp.at(checkpointing=True)


# ---------------------------------------------------------------------------------------- command
def format_plan(rp: RunPlan, plan: Plan, budget: float | None) -> str:
    s = rp.shape
    cfg = rp.cfg
    q = cfg.model.quantization
    kind = "full fine-tuning" if cfg.lora.finetuning == "full" else ("QLoRA" if q == "4bit" else "LoRA")
    lines = [
        f"model: {s.source or cfg.model.base_model}: {s.total_params() / 1e6:,.0f}M parameters, {s.layers} layers, "
        f"hidden {s.hidden}, vocab {s.vocab}, context {s.context}",
        f"run: {kind}, weights {q if q != 'none' else {4: 'fp32', 2: '16-bit'}[rp.weight_bytes]}, compute "
        f"{'fp32' if rp.compute_bytes == 4 else '16-bit'}, attention {rp.attention}, gradient checkpointing "
        f"{'on' if plan.checkpointing else 'off'}, micro-batch {rp.micro_batch} x {rp.seq} tokens ({rp.lengths_note})",
        f"device: {rp.device}",
        "",
    ]
    width = max(len(k) for k in plan.parts)
    for k, v in plan.parts.items():
        lines.append(f"  {k:<{width}}  {v / MIB:>10,.0f} MiB")
    if plan.floor > sum(plan.parts.values()):
        lines.append(f"  {'loading the model (file + weights)':<{width}}  {plan.floor / MIB:>10,.0f} MiB  <- the peak")
    other = rp.at(checkpointing=not plan.checkpointing)
    lines.append(f"  {'(with checkpointing ' + ('off' if plan.checkpointing else 'on') + ')':<{width}}  "
                 f"{other.peak / MIB:>10,.0f} MiB total")
    if budget:
        lines.append("")
        for ckpt in (False, True):
            mb, cut = rp.largest(budget, ckpt)
            lines.append(
                f"fits in {budget / 2**30:.1f} GiB (checkpointing {'on' if ckpt else 'off'}): "
                f"micro_batch_size <= {mb} at {rp.seq} tokens; cutoff_len <= {cut} at micro_batch_size "
                f"{cfg.train.micro_batch_size}"
            )
    lines.append(f"predicted peak: {plan.peak_mib} MiB")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import load_config

    cfg = load_config(args.config, extra)
    _, shape = model_config(cfg)
    lengths = None if args.assume_full else data_lengths(cfg)
    rp = plan_run(cfg, shape, lengths, device=args.device)
    budget = parse_size(args.device_memory) if args.device_memory else None
    _, plan = needs_checkpointing(rp, budget)
    print(format_plan(rp, plan, budget))
    return 0


OWN_FLAGS = {"--device-memory": True, "--device": True, "--assume-full": False}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``plan [CONFIG] [--device-memory X] --key value ...`` -> (argparse's part, the config flags)."""
    mine: list[str] = []
    rest: list[str] = []
    i = 0
    if argv and not argv[0].startswith("-"):
        mine.append(argv[0])
        i = 1
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in OWN_FLAGS:
            takes = OWN_FLAGS[flag] and "=" not in argv[i]
            mine += argv[i : i + 1 + takes]
            i += 1 + takes
        else:
            rest.append(argv[i])
            i += 1
    return mine, rest


__all__ = ["Plan", "RunPlan", "Shape", "estimate", "model_config", "plan_run", "replace"]
