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

    def prompt_ids(self, conv: Conversation, template: PromptTemplate | None = None) -> list[int]:
        """Token ids of the prompt for a conversation ending with the user's message."""
        return self.renderer(template).prompt_ids(conv)

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


class LlamaCppEngine(Engine):
    """The same Engine interface over a GGUF file run by llama.cpp on the CPU.

    Prompts are rendered exactly as for the HF model (the GGUF's tokenizer, loaded through
    transformers, has the same ids); llama.cpp only produces the tokens. Adapters must be merged
    into the GGUF (``export-gguf --adapter``), so the only model is the file itself.
    """

    @classmethod
    def load_gguf(
        cls, path: str, *, template: str | None = None, system_prompt: str | None = None, n_ctx: int = 4096
    ) -> LlamaCppEngine:
        from pathlib import Path

        from ..model.load import load_tokenizer
        from ..tools.gguf import LlamaCppBackend, read_gguf_meta

        backend = LlamaCppBackend(path, n_ctx=n_ctx)
        tok = load_tokenizer(path)
        tmpl = resolve_template(tok, read_gguf_meta(path), template, system_prompt)
        return cls(backend, tok, tmpl, [], Path(path).stem)

    @property
    def context_length(self) -> int:
        return int(self.model.n_ctx)

    def select(self, adapter: str | None) -> None:
        if adapter not in (None, self.name, "base"):
            raise KeyError(adapter)

    def _steps(self, ids: list[int], gen: GenArgs):
        from ..config import ConfigError
        from .decode import Step

        if gen.num_beams > 1:
            raise ConfigError("beam search is not available with the llama.cpp backend; use --backend hf")
        backend = self.model

        def steps():
            toks: list[int] = []
            for tok in backend.iter_ids(ids, gen):
                toks.append(tok)
                end = backend.is_eog(tok)
                done = end or len(toks) >= gen.max_new_tokens
                yield Step(toks, toks, done, ("stop" if end else "length") if done else None)

        return steps


def load_engine(
    backend: str,
    model: str | None,
    adapters: list[str] | None = None,
    *,
    template: str | None = None,
    system_prompt: str | None = None,
    quantization: str = "none",
) -> Engine:
    """The engine for ``--backend hf|llama.cpp``: the one place where backends are chosen.

    Raises:
        ConfigError: llama.cpp without a ``.gguf`` model, or with adapters (merge them into the GGUF).
    """
    from pathlib import Path

    from ..config import ConfigError

    if backend == "llama.cpp":
        if not model or Path(model).suffix != ".gguf" or not Path(model).is_file():
            raise ConfigError(
                f"--backend llama.cpp needs --model FILE.gguf (got {model!r}); write one with "
                "`chinese-vicuna export-gguf --adapter DIR --out FILE.gguf`"
            )
        if adapters:
            raise ConfigError("--backend llama.cpp runs one GGUF file: merge adapters in with `export-gguf --adapter`")
        return LlamaCppEngine.load_gguf(model, template=template, system_prompt=system_prompt)
    if backend != "hf":
        raise ConfigError(f"--backend: expected hf or llama.cpp, got {backend!r}")
    return Engine.load(model, adapters, template=template, system_prompt=system_prompt, quantization=quantization)
