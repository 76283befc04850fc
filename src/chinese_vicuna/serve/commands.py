"""``chinese-vicuna serve``: our OpenAI-compatible server, or vLLM's with the same flags."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..access import is_loopback
from ..config import ConfigError

API_KEY_ENV = "CHINESE_VICUNA_API_KEY"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def register(subparsers, groups) -> None:
    """Add the ``serve`` command."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible API server: base model + adapters, each a `model` name",
        description="OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, "
        "/v1/responses, /health). "
        "With --engine vllm, unknown flags are passed on to vLLM's server.",
    )
    p.add_argument("--model", default=None,
                   help="base model (default: the base recorded with the first adapter, else the embedded SmolLM2)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter folder, served as model NAME (default: the folder name); repeatable")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV})")
    p.add_argument("--max-concurrency", type=_positive, default=None,
                   help="requests generating at once, decoded together in one batch (hf default 8; llama.cpp: "
                   "one at a time; vllm: --max-num-seqs)")
    p.add_argument("--max-queue", type=_positive, default=64,
                   help="requests waiting for a slot; beyond that the server answers 429 at once")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: this package's server; vllm: exec vLLM's OpenAI server (GPU, pip install vllm)")
    p.add_argument("--backend", choices=["hf", "llama.cpp"], default="hf",
                   help="generation backend of the hf engine (llama.cpp: GGUF via llama-cpp-python)")
    p.add_argument("--template", default=None, help="override the prompt template saved with the adapter")
    p.add_argument("--system-prompt", default=None, help="default system prompt")
    p.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    p.add_argument("--cors-origins", default=None, metavar="ORIGIN[,ORIGIN...]",
                   help="browser origins allowed to call the API, comma-separated, or '*' (default: none)")
    p.add_argument("--n-ctx", type=_positive, default=None,
                   help="llama.cpp backend: context length in tokens (default 4096)")
    p.add_argument("--n-gpu-layers", type=int, default=0,
                   help="llama.cpp backend: layers offloaded to the GPU (-1: all; default 0, CPU only)")
    p.set_defaults(func=cmd_serve, allow_extra=True)


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def load_backend(args: argparse.Namespace):
    """The engine behind the server: ours (transformers + peft) or llama.cpp on a GGUF file."""
    from ..generation.engine import load_engine

    return load_engine(args.backend, args.model, args.adapter, template=args.template,
                       system_prompt=args.system_prompt, quantization=args.quantization,
                       n_ctx=getattr(args, "n_ctx", None), n_gpu_layers=getattr(args, "n_gpu_layers", 0))


def vllm_command(args: argparse.Namespace, extra: list[str] = ()) -> list[str]:
    """vLLM's OpenAI server command line for the same flags (``args.model`` must be resolved).

    The base model is served under its folder name, as our server does; adapters keep their names.
    The API key is not put on the command line (``ps`` shows it to every user): ``vllm_env`` passes it.
    """
    from ..model.adapters import has_tokenizer, parse_adapter_specs

    cmd = [sys.executable, "-m", VLLM_MODULE, "--model", str(args.model),
           "--served-model-name", Path(str(args.model)).name or str(args.model)]
    adapters = parse_adapter_specs(args.adapter or [])
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--lora-modules"]
        cmd += [f"{name}={folder}" for name, folder in adapters]
    # the tokenizer the first adapter was trained (and saved) with, else the model's
    tokenizer = adapters[0][1] if adapters and has_tokenizer(adapters[0][1]) else None
    template = vllm_chat_template(args, adapters[0][1] if adapters else None, tokenizer or str(args.model))
    if template is not None:
        cmd += ["--chat-template", str(template)]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    cmd += ["--host", args.host, "--port", str(args.port)]
    if args.max_concurrency:
        cmd += ["--max-num-seqs", str(args.max_concurrency)]
    return cmd + list(extra)


def vllm_chat_template(args: argparse.Namespace, adapter: str | None, tokenizer: str) -> Path | None:
    """The template ``adapter`` was trained with (or ``--template``), as a Jinja file for vLLM.

    vLLM renders chat requests with the base model's own template unless given ``--chat-template``;
    a merged model needs nothing, since ``merge`` already made the trained template its own. The
    file is named by its content's hash in the temp folder and written atomically.
    """
    import hashlib
    import tempfile

    from ..data.templates import get_template
    from ..data.tokenize import chat_template
    from ..model.adapters import read_meta
    from ..model.load import load_tokenizer

    meta = read_meta(adapter) if adapter else {}
    name = args.template or meta.get("template")
    if not name:
        return None
    tok = load_tokenizer(tokenizer)  # the one vLLM will use: it decides BOS and, for auto, the template
    text = chat_template(get_template(name, tok, args.system_prompt or meta.get("system_prompt")), tok)
    path = Path(tempfile.gettempdir()) / f"chinese-vicuna-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jinja"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def vllm_env(api_key: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for vLLM: its server reads ``VLLM_API_KEY`` like ``--api-key``."""
    env = dict(os.environ if environ is None else environ)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def _base_model(args: argparse.Namespace) -> str:
    """--model, else the base recorded with the first adapter (if it exists here), else the embedded one."""
    from ..model.adapters import parse_adapter_specs, read_meta
    from ..model.load import resolve_base_model

    if args.model:
        return args.model
    adapters = parse_adapter_specs(args.adapter or [])
    recorded = read_meta(adapters[0][1]).get("base_model") if adapters else None
    return recorded if recorded and Path(recorded).exists() else resolve_base_model(None)


def _exec_vllm(args: argparse.Namespace, extra: list[str], api_key: str | None) -> int:
    import importlib.util

    if args.backend != "hf":
        raise ConfigError("--engine vllm runs its own backend; leave --backend at hf")
    if importlib.util.find_spec("vllm") is None:
        print(f"error: --engine vllm needs vLLM, which is not installed for {sys.executable} "
              "(pip install vllm; Linux with a CUDA GPU). Use --engine hf to serve with this package.",
              file=sys.stderr)
        return 2
    args.model = _base_model(args)
    cmd = vllm_command(args, extra)
    print("exec:", " ".join(cmd), flush=True)
    os.execve(sys.executable, cmd, vllm_env(api_key))  # replaces this process: signals reach vLLM directly
    return 0  # not reached (unless execve is stubbed in a test)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    api_key = _api_key(args)
    if args.engine == "vllm":
        return _exec_vllm(args, extra, api_key)
    if extra:
        raise ConfigError(f"serve: unrecognized arguments: {' '.join(extra)}")
    import uvicorn

    from .openai_api import create_app

    engine = load_backend(args)
    origins = [o.strip() for o in (args.cors_origins or "").split(",") if o.strip()]
    concurrency = args.max_concurrency or (8 if args.backend == "hf" else 1)
    app = create_app(engine, api_key=api_key, max_concurrency=concurrency, max_queue=args.max_queue,
                     cors_origins=origins)
    if not is_loopback(args.host) and not api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    names = ", ".join([engine.name, *engine.adapters])
    print(f"serving {names} (template {engine.template.name}) at http://{args.host}:{args.port}/v1", flush=True)
    # SIGTERM / Ctrl-C: generations stop at once (open streams get a final error event), then
    # uvicorn gives connections a few seconds to close and exits.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=3)
    _draining_server(config, app.state.server).run()
    return 0


def _draining_server(config, api_server):
    """uvicorn's server, draining our jobs as soon as a shutdown signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            api_server.drain()
            super().handle_exit(sig, frame)

    return Server(config)
