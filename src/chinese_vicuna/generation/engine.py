"""A loaded model ready to answer: base + adapters + template + the token iterator.

The terminal chat, the web UI and the API server all hold one ``Engine`` and call
``engine.stream(conversation, gen)``. A lock serialises generation on the shared model (and
the active-adapter switch that goes with it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..data.formats import Conversation
from ..data.templates import PromptTemplate, add_eos_ids, get_template
from ..data.tokenize import Renderer
from .decode import GenArgs, TextStream


def resolve_template(tok, meta: dict, name: str | None = None, system_prompt: str | None = None) -> PromptTemplate:
    """The template to serve with: the one asked for, else the recorded one, else the tokenizer's own."""
    name = name or meta.get("template") or ("auto" if getattr(tok, "chat_template", None) else "alpaca")
    return get_template(name, tok, system_prompt or meta.get("system_prompt"))


@dataclass
class Engine:
    model: object
    tokenizer: object
    template: PromptTemplate
    adapters: list[str] = field(default_factory=list)
    """Names of the loaded adapters; ``None``/"base" selects the bare base model."""
    name: str = "base"
    lock: threading.Lock = field(default_factory=threading.Lock)
    batcher: object | None = None
    """A ``batch.Batcher`` once ``enable_batching`` ran: greedy/sampled requests then decode together."""

    def __post_init__(self):
        # A template whose replies end with their own marker (<|eot_id|>, <|im_end|>) that is not
        # the tokenizer's EOS must stop there too, as it was trained to.
        add_eos_ids(getattr(self.model, "generation_config", None), self.template.end_token_ids())

    @classmethod
    def load(
        cls,
        base_model: str | None = None,
        adapter_specs: list[str] | None = None,
        *,
        template: str | None = None,
        system_prompt: str | None = None,
        quantization: str = "none",
        dtype: str = "auto",
    ) -> Engine:
        """Load base + adapters (``DIR`` or ``NAME=DIR``).

        The template is the first adapter's, or for a merged model the one recorded in its folder.
        """
        from pathlib import Path

        from ..model.adapters import load_for_inference, parse_adapter_specs, read_meta

        specs = adapter_specs or []
        model, tok, meta = load_for_inference(base_model, specs, quantization=quantization, dtype=dtype)
        if not specs and base_model and Path(base_model).is_dir():
            meta = read_meta(base_model)  # a merged model keeps the template it was trained with
        tmpl = resolve_template(tok, meta, template, system_prompt)
        base_name = Path(base_model).name if base_model else Path(str(model.config._name_or_path)).name or "base"
        return cls(model, tok, tmpl, [n for n, _ in parse_adapter_specs(specs)], base_name)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def renderer(self, template: PromptTemplate | None = None) -> Renderer:
        return Renderer(self.tokenizer, template or self.template, cutoff_len=self.context_length)

    def prompt_ids(self, conv: Conversation, template: PromptTemplate | None = None, prefill: str = "") -> list[int]:
        """Token ids of the prompt for a conversation ending with the user's message.

        ``prefill``: the start of the assistant's reply, which generation continues. The rendered
        prompt and the prefill are tokenized as one string, as the model would have seen them.
        """
        renderer = self.renderer(template)
        ids = renderer.prompt_ids(conv)
        if not prefill:
            return ids
        text = "".join(s.text for s in renderer.template.segments(conv, True, self.tokenizer.eos_token))
        body = renderer.encode(text)
        return ids[: len(ids) - len(body)] + renderer.encode(text + prefill)

    @property
    def vocab_size(self) -> int:
        """Width of the logits (can exceed the tokenizer's length: padded embeddings)."""
        return int(getattr(self.model.config, "vocab_size", None) or len(self.tokenizer))

    def eos_ids(self) -> list[int]:
        from .decode import eos_ids

        return eos_ids(self.model, self.tokenizer)

    def check_constraint(self, constraint) -> None:
        """Compile ``constraint`` for this tokenizer; raises ``ConstraintError`` naming what fails."""
        from .constrain import compile_grammar, ll_tokenizer

        compile_grammar(constraint, ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids()))

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes a token stands for (a Chinese character may span several tokens)."""
        from .constrain import ll_tokenizer

        return ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids()).decode_bytes([token])

    def embed(self, texts: list[str | list[int]], adapter: str | None = None) -> tuple[list[list[float]], int]:
        """L2-normalised mean of the last hidden states over each text's tokens; returns (vectors, tokens).

        A text longer than the context is embedded from its first ``context_length`` tokens.
        """
        import torch

        out, total = [], 0
        with self.lock, torch.no_grad():
            self.select(adapter)
            for text in texts:
                ids = text if isinstance(text, list) else self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids = ids[: self.context_length] or [self.tokenizer.eos_token_id]
                total += len(ids)
                device = next(self.model.parameters()).device
                hidden = self.model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True,
                                    logits_to_keep=1).hidden_states[-1][0].float()
                out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
        return out, total

    def enable_batching(self, max_batch: int) -> bool:
        """Decode concurrent ``stream`` calls together (continuous batching); False if this model can't.

        Models with sliding-window attention are left serial: the merged cache is a plain one.
        """
        cfg = self.model.config
        if max_batch < 2 or getattr(cfg, "sliding_window", None) or "sliding_attention" in (
                getattr(cfg, "layer_types", None) or []):
            return False
        from .batch import Batcher

        self.batcher = Batcher(self, max_batch)
        return True

    def select(self, adapter: str | None) -> None:
        """Activate an adapter by name; ``None`` or the base name runs the bare base model."""
        if not self.adapters:
            if adapter not in (None, self.name, "base"):
                raise KeyError(adapter)
            return
        if adapter in (None, self.name, "base"):
            self.model.base_model.disable_adapter_layers()
            return
        if adapter not in self.adapters:
            raise KeyError(adapter)
        self.model.base_model.enable_adapter_layers()
        self.model.set_adapter(adapter)

    def stream(
        self,
        conv: Conversation | list[int],
        gen: GenArgs,
        *,
        adapter: str | None = None,
        stop_strings: tuple[str, ...] | list[str] = (),
        template: PromptTemplate | None = None,
        cancel=None,
    ) -> TextStream:
        """A TextStream for the reply. Iterate it while holding ``engine.lock`` (see ``generate``)."""
        ids = conv if isinstance(conv, list) else self.prompt_ids(conv, template)
        stops = tuple((template or self.template).stop_strings) + tuple(stop_strings)
        if self.batcher is not None and gen.num_beams == 1:
            if adapter not in (None, self.name, "base") and adapter not in self.adapters:
                raise KeyError(adapter)
            batcher = self.batcher
            return TextStream(self.model, self.tokenizer, ids, gen, stops, cancel,
                              steps=lambda: batcher.steps(ids, gen, adapter, cancel))
        return _LockedStream(self, adapter, self.model, self.tokenizer, ids, gen, stops, cancel, self._steps(ids, gen))

    def _steps(self, ids: list[int], gen: GenArgs):
        """The token source: None = our decoder on ``self.model``."""
        return None

    def generate(self, conv: Conversation | list[int], gen: GenArgs, **kwargs) -> TextStream:
        """Run to the end and return the finished stream (``.text``, ``.finish_reason``, counts)."""
        stream = self.stream(conv, gen, **kwargs)
        stream.run()
        return stream


class _LockedStream(TextStream):
    """Holds the engine lock (and the selected adapter) for the whole generation."""

    def __init__(self, engine: Engine, adapter: str | None, *args):
        super().__init__(*args)
        self.engine, self.adapter = engine, adapter

    def __iter__(self):
        with self.engine.lock:
            self.engine.select(self.adapter)
            yield from super().__iter__()


@dataclass
class LlamaCppEngine(Engine):
    """The same Engine interface over a GGUF file run by llama.cpp on the CPU.

    Prompts are rendered exactly as for the HF model (the GGUF's tokenizer, loaded through
    transformers, has the same ids); llama.cpp only produces the tokens. Adapters are llama.cpp
    LoRA GGUF files (adapter folders are converted at load, ``tools.gguf.write_lora_gguf``), all
    loaded once and applied per request without merging.
    """

    loras: dict = field(default_factory=dict)
    """Adapter name -> llama.cpp LoRA handle."""

    @classmethod
    def load_gguf(
        cls, path: str, *, template: str | None = None, system_prompt: str | None = None, n_ctx: int = 4096,
        n_gpu_layers: int = 0, adapter_specs: list[str] | None = None,
    ) -> LlamaCppEngine:
        import tempfile
        from pathlib import Path

        from ..model.adapters import parse_adapter_specs, read_meta
        from ..model.load import load_tokenizer
        from ..tools.gguf import gguf_config, read_gguf_meta, write_lora_gguf
        from .llamacpp import LlamaCppBackend

        backend = LlamaCppBackend(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
        tok = load_tokenizer(path)
        meta = read_gguf_meta(path)
        loras = {}
        specs = parse_adapter_specs(adapter_specs or [])
        with tempfile.TemporaryDirectory(prefix="lora-gguf-") as tmp:
            for name, where in specs:
                if Path(where).is_dir():  # a peft folder: convert it (small: only the LoRA matrices)
                    meta = {**read_meta(where), **meta} if not loras else meta
                    where = write_lora_gguf(where, gguf_config(path), Path(tmp) / f"{name}.gguf")
                loras[name] = backend.load_lora(where)
        tmpl = resolve_template(tok, meta, template, system_prompt)
        return cls(backend, tok, tmpl, list(loras), Path(path).stem, loras=loras)

    @property
    def context_length(self) -> int:
        return int(self.model.n_ctx)

    def select(self, adapter: str | None) -> None:
        if adapter not in (None, self.name, "base") and adapter not in self.loras:
            raise KeyError(adapter)
        self.model.use_lora(self.loras.get(adapter))

    @property
    def vocab_size(self) -> int:
        return int(self.model.llm.n_vocab())

    def enable_batching(self, max_batch: int) -> bool:
        return False  # llama-cpp-python's Llama decodes one sequence at a time

    def eos_ids(self) -> list[int]:
        return self.model.eog_ids()

    def token_bytes(self, token: int) -> bytes:
        return self.model.llm.detokenize([token])

    def embed(self, texts: list[str], adapter: str | None = None):
        from ..config import ConfigError

        raise ConfigError("embeddings need --backend hf: llama.cpp loads this GGUF for generation only "
                          "(an embedding context is a second model load)")

    def _steps(self, ids: list[int], gen: GenArgs):
        from dataclasses import replace

        import numpy as np
        import torch

        from ..config import ConfigError
        from .constrain import Matcher, compile_grammar, ll_tokenizer
        from .decode import Step, TokenLogprob

        if gen.num_beams > 1:
            raise ConfigError("beam search is not available with the llama.cpp backend; use --backend hf")
        backend = self.model
        if gen.seed is not None:
            gen = replace(gen, seed=gen.seed % 2**32)  # llama.cpp seeds are 32-bit
        # The grammar is llguidance's, as on the HF backend, applied in our logits processor:
        # llama-cpp-python's own JSON-schema converter drops keywords such as minimum/maximum.
        matcher = None
        if gen.constraint is not None:
            llt = ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids())
            matcher = Matcher(compile_grammar(gen.constraint, llt), llt, self.eos_ids())
        last: list[np.ndarray] = []
        bias = None
        if gen.logit_bias:
            bias = np.zeros(self.vocab_size, dtype=np.float32)
            for tok, value in gen.logit_bias.items():
                bias[tok] = value

        def hook(scores: np.ndarray) -> np.ndarray:
            # logit_bias and the grammar mask, then what logprobs report: log-softmax after
            # penalties, bias, temperature and mask (as on the HF backend)
            if bias is not None:
                scores = scores + bias
            if matcher is not None:
                scores = np.array(scores, dtype=np.float32)
                matcher.mask(torch.from_numpy(scores))
            if gen.logprobs is not None:
                z = scores / (gen.temperature if gen.do_sample else 1.0)
                z = z - z.max()
                last[:] = [z - np.log(np.exp(z).sum())]
            return scores

        use_hook = bias is not None or gen.logprobs is not None or matcher is not None

        def steps():
            toks: list[int] = []
            lps: list[TokenLogprob] | None = [] if gen.logprobs is not None else None
            for tok in backend.iter_ids(ids, gen, hook=hook if use_hook else None):
                toks.append(tok)
                if matcher is not None:
                    matcher.advance(tok)
                if lps is not None and last:
                    row = last[0]
                    top = np.argsort(-row)[: gen.logprobs] if gen.logprobs else []
                    lps.append(TokenLogprob(tok, float(row[tok]), [(int(t), float(row[t])) for t in top]))
                end = backend.is_eog(tok)
                done = end or len(toks) >= gen.max_new_tokens
                yield Step(toks, toks, done, ("stop" if end else "length") if done else None, lps)

        return steps


def load_engine(
    backend: str,
    model: str | None,
    adapters: list[str] | None = None,
    *,
    template: str | None = None,
    system_prompt: str | None = None,
    quantization: str = "none",
    n_ctx: int | None = None,
    n_gpu_layers: int = 0,
) -> Engine:
    """The engine for ``--backend hf|llama.cpp``: the one place where backends are chosen.

    Raises:
        ConfigError: llama.cpp without a ``.gguf`` model.
    """
    from pathlib import Path

    from ..config import ConfigError

    if backend == "llama.cpp":
        if not model or Path(model).suffix != ".gguf" or not Path(model).is_file():
            raise ConfigError(
                f"--backend llama.cpp needs --model FILE.gguf (got {model!r}); write one with "
                "`chinese-vicuna export-gguf --adapter DIR --out FILE.gguf`"
            )
        return LlamaCppEngine.load_gguf(model, template=template, system_prompt=system_prompt,
                                        n_ctx=n_ctx or 4096, n_gpu_layers=n_gpu_layers, adapter_specs=adapters)
    if backend != "hf":
        raise ConfigError(f"--backend: expected hf or llama.cpp, got {backend!r}")
    if n_ctx is not None or n_gpu_layers:
        raise ConfigError("--n-ctx and --n-gpu-layers are llama.cpp settings: add --backend llama.cpp")
    return Engine.load(model, adapters, template=template, system_prompt=system_prompt, quantization=quantization)
