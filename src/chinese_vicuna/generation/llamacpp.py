"""llama.cpp at run time: decoding and LoRA adapters over a GGUF file, and its perplexity.

The files themselves (export, metadata, LoRA adapter GGUFs) are written by ``tools/gguf.py``.
"""

from __future__ import annotations

import codecs
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

from ..config import ConfigError
from .decode import GenArgs


class LlamaCppBackend:
    """Text generation from a GGUF file with llama-cpp-python, same ``GenArgs`` as the HF path.

    Tokens come from ``Llama.generate`` (the loop under ``create_completion``) so the ids are
    ours to count and compare; text deltas go through an incremental UTF-8 decoder, so a Chinese
    character split over byte tokens is never emitted half. Repetition penalty, no-repeat-ngram
    and min-new-tokens run as transformers' own logits processors over prompt + reply, so greedy
    decoding matches HF ``generate`` token for token; temperature/top-k/top-p are llama.cpp's.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0):
        from llama_cpp import Llama

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        threads = n_threads or len(os.sched_getaffinity(0))
        self.path = str(path)
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu_layers  # -1: all; ignored by a CPU-only llama.cpp build
        self.llm = Llama(model_path=self.path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_gpu_layers=n_gpu_layers, verbose=False)
        self.finish_reason: str | None = None
        self.prompt_tokens = self.completion_tokens = 0
        self.last_ids: list[int] = []
        self._eog: list[int] | None = None

    def close(self) -> None:
        """Free the model now (llama-cpp-python otherwise frees it at exit, noisily)."""
        self.llm.close()

    def load_lora(self, path: str | os.PathLike):
        """Load a LoRA adapter GGUF for this model (applied per request with ``use_lora``)."""
        import llama_cpp

        handle = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode("utf-8"))
        if not handle:
            raise ConfigError(f"{path}: llama.cpp could not load this LoRA adapter GGUF for {self.path}")
        return handle

    def use_lora(self, handle) -> None:
        """Apply one loaded adapter (``None``: the bare model); the prompt cache is dropped when it changes."""
        import llama_cpp

        if handle is getattr(self, "_lora", None):
            return
        if handle is None:
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            rc = llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not set the LoRA adapter (code {rc})")
        self._lora = handle
        self.llm.reset()  # cached prompt states were computed with the other weights

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def token_ids(self, text: str) -> list[int]:
        """``text`` tokenized as the model's HF tokenizer does (BOS if it adds one, special tokens parsed)."""
        import llama_cpp

        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(self.llm.model)))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self.llm.model), token))

    def eog_ids(self) -> list[int]:
        """Every end-of-generation id llama.cpp knows for this vocabulary (EOS, EOT, <|im_end|>, ...)."""
        if self._eog is None:
            self._eog = [t for t in range(self.llm.n_vocab()) if self.is_eog(t)]
        return self._eog

    def _processor(self, gen: GenArgs, prompt_len: int, hook=None):
        """The HF engine's own penalty processors, over prompt + reply, as a llama.cpp logits processor.

        ``hook(scores) -> scores`` runs after them (the server's logit_bias and logprobs).
        """
        import numpy as np
        import torch

        from .decode import penalty_processors

        procs = penalty_processors(gen, prompt_len, self.eog_ids() if gen.min_new_tokens else [])
        if not procs and hook is None:
            return None

        def apply(input_ids, scores):
            s = torch.from_numpy(np.array(scores, dtype=np.float32))[None]
            if procs:
                s = procs(torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None], s)
            out = s[0].numpy()
            return hook(out) if hook is not None else out

        return [apply]

    def iter_ids(self, prompt_ids: list[int], gen: GenArgs, *, grammar=None, hook=None) -> Iterator[int]:
        """Generated token ids (the final EOG token included), ``gen.max_new_tokens`` at most."""
        if len(prompt_ids) >= self.n_ctx:
            raise ConfigError(f"prompt is {len(prompt_ids)} tokens, the context is {self.n_ctx}")
        limit = min(gen.max_new_tokens, self.n_ctx - len(prompt_ids))
        if gen.seed is not None:
            self.llm.set_seed(gen.seed)
        kwargs = dict(temp=gen.temperature, top_k=gen.top_k, top_p=gen.top_p) if gen.do_sample else dict(temp=0.0)
        steps = self.llm.generate(
            prompt_ids, min_p=0.0, typical_p=1.0, repeat_penalty=1.0, reset=True,
            logits_processor=self._processor(gen, len(prompt_ids), hook), grammar=grammar, **kwargs,
        )
        self.finish_reason = "length"
        for n, tok in enumerate(steps, 1):
            yield tok
            if self.is_eog(tok):
                self.finish_reason = "stop"
                break
            if n >= limit:
                break
        steps.close()

    def stream(self, prompt: str | list[int], gen: GenArgs, stop_strings: tuple[str, ...] = ()) -> Iterator[str]:
        """Text deltas of the reply (UTF-8 safe, cut before any stop string)."""
        from .stream import StopFilter

        ids = self.token_ids(prompt) if isinstance(prompt, str) else list(prompt)
        self.prompt_tokens, self.last_ids = len(ids), []
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = StopFilter(tuple(stop_strings))
        for tok in self.iter_ids(ids, gen):
            self.last_ids.append(tok)
            self.completion_tokens = len(self.last_ids)
            if self.is_eog(tok):
                break
            delta = stop.push(utf8.decode(self.llm.detokenize([tok])))
            if delta:
                yield delta
            if stop.stopped:
                self.finish_reason = "stop"
                return
        tail = stop.push(utf8.decode(b"", final=True)) + stop.flush()
        if stop.stopped:
            self.finish_reason = "stop"
        if tail:
            yield tail

    def generate(self, prompt: str | list[int], gen: GenArgs, stop_strings: tuple[str, ...] = ()) -> str:
        """The whole reply as one string."""
        return "".join(self.stream(prompt, gen, stop_strings))


def gguf_perplexity(path: str | os.PathLike, ids: list[int], window: int = 512, n_threads: int | None = None) -> float:
    """Perplexity of ``ids`` in non-overlapping windows (each window restarts the context), from llama.cpp logits."""
    import numpy as np
    from llama_cpp import Llama

    threads = n_threads or len(os.sched_getaffinity(0))
    llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
            top = logits.max(-1)
            logz = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
            nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
            count += len(chunk) - 1
    finally:
        llm.close()
    if not count:
        raise ConfigError("perplexity needs at least 2 tokens")
    return float(np.exp(nll / count))
