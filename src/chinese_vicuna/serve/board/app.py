"""``chinese-vicuna board``: the whole workflow in one Gradio app (model, data, train, evaluate, chat, export).

``Board`` holds the state and the actions; the page is laid out in ``ui.py`` from one module per
tab (``tabs/``). Every tab calls the code the CLI runs: ``data inspect``'s renderer, ``chinese-vicuna train`` as a
separate process (``runs.py``), ``eval compare`` / ``eval ppl`` / ``eval ceval|cmmlu``'s functions,
``chinese-vicuna webui`` for the chat, ``merge`` and ``export-gguf``. Typed paths go through
:class:`PathGuard`. The page polls the run folders once a second (``gr.Timer``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ...config import ConfigError
from .form import PATH_KEYS, RESUME_WORDS, FieldSpec, command_line, field_specs, preset_values, to_argv
from .paths import PathGuard, PathRefused
from .runs import RunManager, log_tail, read_metrics

EMBEDDED = "embedded: SmolLM2-135M-Instruct"
DATA_SUFFIXES = (".json", ".jsonl", ".txt", ".parquet")


def _user_errors() -> tuple[type, ...]:
    from ...data.datasets import DataError
    from ...data.formats import RecordError
    from ...data.templates import TemplateError
    from ...model.load import ModelLoadError

    return (ConfigError, DataError, RecordError, TemplateError, ModelLoadError, PathRefused, FileNotFoundError,
            RuntimeError)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Board:
    """The board's state and event handlers (plain methods: testable without a browser)."""

    def __init__(self, guard: PathGuard, output_roots: list[Path], host: str = "127.0.0.1",
                 auth: tuple[str, str] | None = None):
        self.guard = guard
        self.workdir = guard.workdir
        self.output_roots = output_roots
        self.runs = RunManager(self.workdir, output_roots)
        self.specs: list[FieldSpec] = field_specs()
        self.keys = [s.key for s in self.specs]
        self.host, self.auth = host, auth
        self.chat: subprocess.Popen | None = None
        self.chat_url: str | None = None
        self._tokenizers: dict[str, object] = {}
        self._lock = threading.Lock()

    # -- helpers ----------------------------------------------------------------------------
    def rel(self, p: Path | str) -> str:
        return self.guard.show(p)

    def base_arg(self, base: str | None) -> str | None:
        """The Model tab's choice as a ``base_model`` value (None: the embedded model)."""
        from ...model.load import looks_like_hub_id

        base = (base or "").strip()
        if not base or base == EMBEDDED:
            return None
        if looks_like_hub_id(base) and not (self.workdir / base).exists():
            return base
        return str(self.guard.resolve(base, what="base model"))

    def data_files(self) -> list[str]:
        """Data files under data/ of the working directory and the data roots."""
        found = []
        for root in [self.workdir / "data", *self.guard.data_roots]:
            if root.is_dir():
                for p in sorted(root.rglob("*")):
                    if p.is_file() and p.suffix in DATA_SUFFIXES and len(p.relative_to(root).parts) <= 3 \
                            and p.name != "README.md":
                        found.append(self.rel(p))
        return found

    def model_choices(self) -> list[str]:
        found = [EMBEDDED]
        for root in [self.workdir / "models", *self.output_roots]:
            if root.is_dir():
                for p in sorted(root.iterdir()):
                    if (p / "config.json").exists() or p.suffix == ".gguf":
                        found.append(self.rel(p))
        return found

    def adapters(self) -> list[str]:
        """Finished runs (an adapter in the folder), newest first, as paths relative to the workdir."""
        return [self.rel(r.path) for r in self.runs.runs() if r.has_adapter]

    # -- Model tab --------------------------------------------------------------------------
    def model_info(self, base: str | None, quantization: str) -> str:
        from ...model.load import resolve_base_model

        try:
            arg = self.base_arg(base)
        except PathRefused as e:
            return f"error: {e}"
        if arg and not Path(arg).exists():
            return f"**{arg}**: a hub id (downloaded when training starts)"
        try:
            path = Path(resolve_base_model(arg))
        except Exception as e:  # a missing folder etc.: say so in the page
            return f"error: {e}"
        lines = [f"**{self.rel(path)}**"]
        if path.suffix == ".gguf":
            lines.append(f"GGUF file, {path.stat().st_size / 2**20:.1f} MiB")
        else:
            lines += self._folder_info(path)
        lines += self._plan(arg, quantization)
        return "  \n".join(lines)

    @staticmethod
    def _folder_info(path: Path) -> list[str]:
        from safetensors import safe_open

        cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        params, size = 0, 0
        for f in sorted(path.glob("*.safetensors")):
            size += f.stat().st_size
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    n = 1
                    for d in st.get_slice(k).get_shape():
                        n *= d
                    params += n
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "?"
        arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "?")
        return [f"{arch} · {params / 1e6:.1f} M parameters · {dtype} · {size / 2**20:.0f} MiB on disk",
                f"context {cfg.get('max_position_embeddings', '?')} tokens · vocabulary {cfg.get('vocab_size', '?')}"]

    def _plan(self, base: str | None, quantization: str) -> list[str]:
        """The memory planner's estimate when ``chinese-vicuna plan`` exists (its CLI, as a user runs it)."""
        if importlib.util.find_spec("chinese_vicuna.train.plan") is None:
            return []
        cmd = [sys.executable, "-m", "chinese_vicuna", "plan", "--assume-full", "--quantization", quantization]
        cmd += ["--base_model", base] if base else []
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.workdir)
        except subprocess.TimeoutExpired:
            return ["memory plan: timed out"]
        text = (out.stdout if out.returncode == 0 else out.stderr).strip()
        return ["memory plan:", f"```\n{text[-3000:]}\n```"]

    # -- Data tab ---------------------------------------------------------------------------
    def add_path(self, text: str, selected: list[str]):
        import gradio as gr

        try:
            p = self.guard.resolve(text, what="data file")
            if not p.exists():
                raise FileNotFoundError(f"{text}: no such file")
        except (PathRefused, FileNotFoundError) as e:
            return gr.skip(), f"error: {e}"
        rel = self.rel(p)
        choices = sorted(set(self.data_files()) | set(selected or []) | {rel})
        return gr.update(choices=choices, value=sorted(set(selected or []) | {rel})), f"added {rel}"

    def upload(self, file, selected: list[str]):
        import gradio as gr

        if not file:
            return gr.skip(), ""
        src = Path(file if isinstance(file, str) else file.name)
        dest_dir = self.workdir / "data" / "uploads"
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / Path(src.name).name
        shutil.copyfile(src, dest)
        rel = self.rel(dest)
        choices = sorted(set(self.data_files()) | set(selected or []))
        return gr.update(choices=choices, value=sorted(set(selected or []) | {rel})), f"uploaded to {rel}"

    def tokenizer(self, base: str | None):
        from ...model.load import load_tokenizer, resolve_base_model

        path = resolve_base_model(self.base_arg(base))
        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(path)
        return self._tokenizers[path]

    def inspect(self, files: list[str], fmt: str, template: str, base: str | None, cutoff_len: float):
        """``data inspect`` in the page: (rendered sample HTML, statistics markdown, error line)."""
        from rich.console import Console

        from ...tools.inspect import inspect_data

        if not files:
            return "", "", "error: pick at least one data file"
        try:
            paths = [str(self.guard.resolve(f, what="data file")) for f in files]
            console = Console(record=True, width=110, file=io.StringIO(), color_system="truecolor")
            stats = inspect_data(paths, self.tokenizer(base), template=template, fmt=fmt,
                                 cutoff_len=int(cutoff_len or 256), show=1, console=console)
        except _user_errors() as e:
            return "", "", f"error: {e}"
        html = console.export_html(inline_styles=True, code_format=(
            '<pre style="white-space:pre-wrap;font-family:monospace;font-size:13px">{code}</pre>'))
        line = (f"{stats['records']} records · tokens min / mean / max {stats['tokens_min']} / {stats['tokens_mean']} / "
                f"{stats['tokens_max']} · trained mean {stats['trained_tokens_mean']} · {stats['truncated']} truncated · "
                f"{stats['dropped']} dropped")
        return html, line, f"ok: {stats['records']} records"

    # -- Train tab --------------------------------------------------------------------------
    def command(self, *values) -> str:
        return command_line(to_argv(self.specs, list(values)))

    def load_preset(self, name: str) -> list:
        import gradio as gr

        if not name:
            return [gr.skip()] * len(self.specs)
        try:
            return preset_values(self.specs, self.guard.resolve(name, what="preset"))
        except (ConfigError, PathRefused, OSError) as e:
            gr.Warning(str(e))
            return [gr.skip()] * len(self.specs)

    def check_paths(self, values: dict) -> Path:
        """Every path-valued key through the guard; returns the output folder."""
        for key, mode in PATH_KEYS.items():
            value = values.get(key)
            if key not in values or value in (None, ""):
                continue
            if key == "base_model":
                self.base_arg(value)
            elif key == "resume" and str(value).strip() in RESUME_WORDS:
                continue
            elif key == "data_path":
                for item in str(value).split(","):
                    path = item.strip().rsplit("*", 1)[0] if "*" in item else item.strip()
                    if path and ("/" in path or Path(self.workdir / path).exists()) and not path.startswith("hf:"):
                        self.guard.resolve(path, what="data_path")
            else:
                self.guard.resolve(value, write=mode == "write", what=key)
        return self.guard.resolve(values.get("output_dir") or "outputs/run", write=True, what="output_dir")

    def start(self, *values) -> tuple[str, object]:
        import gradio as gr

        from ...config import load_config

        argv = to_argv(self.specs, list(values))
        try:
            out = self.check_paths(dict(zip(self.keys, values)))
            load_config(None, argv)  # the CLI's own checks, before a process is started
            self.runs.start(argv, out)
        except _user_errors() as e:
            return f"error: {e}", gr.skip()
        runs = [self.rel(d) for d in self.runs.folders()]
        return f"started: `{command_line(argv)}`", gr.update(choices=runs, value=self.rel(out))

    def stop(self, run: str) -> str:
        try:
            return self.runs.stop(self.guard.resolve(run, what="run"))
        except _user_errors() as e:
            return f"error: {e}"

    def resume(self, run: str) -> str:
        try:
            folder = self.guard.resolve(run, write=True, what="run")
            self.runs.resume(folder)
        except _user_errors() as e:
            return f"error: {e}"
        return f"resuming {self.rel(folder)} from its newest checkpoint"

    def runs_table(self) -> list[list]:
        rows = []
        for r in self.runs.runs():
            rows.append([self.rel(r.path), r.state, f"{r.step}/{r.total or '?'}", _fmt(r.loss), _fmt(r.val_loss),
                         _fmt(r.tokens_per_s, ".0f"), _duration(r.eta_s), r.checkpoints, r.source])
        return rows

    def run_status(self, run: str | None) -> tuple[str, object, str, str]:
        """(status line, loss curve data, log tail, tracker links) of one run."""
        import pandas as pd

        # None, not an empty frame: a LinePlot first drawn from an empty frame never draws the lines it is given later
        empty = None
        if not run:
            return "no run selected", empty, "", ""
        try:
            folder = self.guard.resolve(run, what="run")
        except PathRefused as e:
            return f"error: {e}", empty, "", ""
        r = self.runs.run(folder)
        rows = read_metrics(folder)
        points = [(m["step"], m["loss"], "train") for m in rows if "loss" in m]
        points += [(m["step"], m["val_loss"], "validation") for m in rows if "val_loss" in m]
        df = pd.DataFrame(points, columns=["step", "loss", "series"]) if points else empty
        line = (f"**{self.rel(folder)}** · {r.state} · step {r.step}/{r.total or '?'} · loss {_fmt(r.loss)} · "
                f"val {_fmt(r.val_loss)} · {_fmt(r.tokens_per_s, '.0f')} tokens/s · ETA {_duration(r.eta_s)} · "
                f"{r.checkpoints} checkpoint(s) · {len(points)} loss points")
        trackers = "  \n".join(f"{name}: `{hint}`" for name, hint in (r.trackers or {}).items())
        tail = log_tail(folder) or ("(started from the command line: its output is in that terminal)"
                                    if r.source == "cli" else "")
        return line, df, tail, trackers

    # -- Evaluate tab -----------------------------------------------------------------------
    def _adapter_specs(self, adapters: list[str]) -> list[str]:
        return [f"{Path(a).name}={self.guard.resolve(a, what='adapter')}" for a in adapters or []]

    def compare(self, adapters: list[str], prompts: str, limit: float, max_new_tokens: float, base: str | None):
        from ...data.datasets import read_prompts
        from ...eval import compare as cmp
        from ...generation.decode import GenArgs

        try:
            specs = self._adapter_specs(adapters)
            path = self.guard.resolve(prompts, what="prompts")
            items = read_prompts(str(path), int(limit or 0) or None)
            with self._lock:  # one model at a time on this machine
                columns = cmp.compare(items, specs, self.base_arg(base) if not specs else None,
                                      GenArgs(max_new_tokens=int(max_new_tokens or 64)))
        except _user_errors() as e:
            return [], f"error: {e}"
        names = list(columns)
        rows = [[ins + (f"\n{ctx}" if ctx else ""), *[columns[n][k] for n in names]] for k, (ins, ctx) in enumerate(items)]
        import pandas as pd

        return pd.DataFrame(rows, columns=["prompt", *names]), f"compared {len(items)} prompts: {', '.join(names)}"

    def _each_model(self, adapters: list[str], base: str | None):
        """(column name, model, tokenizer, meta) for the base and each adapter, loaded one after another."""
        from ...model.adapters import load_for_inference

        specs = self._adapter_specs(adapters)
        base_arg = self.base_arg(base)
        first = specs[0].split("=", 1)[1] if specs else None
        from ...model.adapters import default_base, read_meta

        base_path = base_arg or (default_base(first, read_meta(first)) if first else None)
        yield ("base", *load_for_inference(base_path, []))
        for spec in specs:
            yield (spec.split("=", 1)[0], *load_for_inference(base_path, [spec]))

    def perplexity(self, adapters: list[str], data: str, base: str | None) -> str:
        from ...eval.perplexity import perplexity
        from ...model.vocab import read_texts

        try:
            text = "\n\n".join(read_texts([str(self.guard.resolve(data, what="text file"))]))
            rows = []
            with self._lock:
                for name, model, tok, _ in self._each_model(adapters, base):
                    r = perplexity(model, tok, text, window=256, stride=128, progress=False)
                    rows.append(f"| {name} | {r['ppl']:.3f} | {r['scored_tokens']} | {r['bits_per_char']:.3f} |")
        except _user_errors() as e:
            return f"error: {e}"
        return "| model | perplexity | tokens | bits/char |\n|---|---|---|---|\n" + "\n".join(rows)

    def benchmark(self, adapters: list[str], kind: str, data: str, limit: float, base: str | None) -> str:
        from ...eval.benchmarks import evaluate

        if kind == "cmmlu":
            from ...eval.cmmlu import CMMLU as bench

            split = "test"
        else:
            from ...eval.ceval import CEVAL as bench

            split = "val"
        try:
            folder = self.guard.resolve(data, what="benchmark folder")
            rows = []
            with self._lock:
                for name, model, tok, _ in self._each_model(adapters, base):
                    r = evaluate(model, tok, bench, folder, split=split, limit=int(limit or 0) or None,
                                 progress=False)
                    n = sum(s["total"] for s in r["subjects"].values())
                    avg = r.get("average")
                    rows.append(f"| {name} | {_fmt(None if avg is None else 100 * avg, '.1f')}% | {n} |")
        except _user_errors() as e:
            return f"error: {e}"
        return f"| model | {bench.name} accuracy | questions |\n|---|---|---|\n" + "\n".join(rows)

    # -- Chat tab ---------------------------------------------------------------------------
    def open_chat(self, adapter: str | None, request=None) -> tuple[str, str]:
        """Start ``chinese-vicuna webui`` (the chat page) for the adapter and show it in a frame."""
        import httpx

        self.close_chat()
        cmd = [sys.executable, "-m", "chinese_vicuna", "webui", "--host", self.host]
        try:
            if adapter and adapter != "base":
                cmd += ["--adapter", f"{Path(adapter).name}={self.guard.resolve(adapter, what='adapter')}"]
        except PathRefused as e:
            return "", f"error: {e}"
        port = free_port(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")
        cmd += ["--port", str(port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if self.auth:
            cmd += ["--auth", ":".join(self.auth)]
        log = Path(tempfile.gettempdir()) / f"chinese-vicuna-board-chat-{port}.log"
        with open(log, "wb") as out:
            self.chat = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, env=env)
        local = f"http://127.0.0.1:{port}/" if self.host in ("0.0.0.0", "::", "127.0.0.1") else f"http://{self.host}:{port}/"
        deadline = time.monotonic() + 300
        while True:
            if self.chat.poll() is not None:
                return "", f"error: the chat page exited: {log.read_text(errors='replace')[-1500:]}"
            try:
                if httpx.get(local, timeout=2).status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                return "", "error: the chat page did not start within 5 minutes"
            time.sleep(0.5)
        # The frame is loaded by the browser: use the host name the browser reached the board by.
        host = self.host
        if request is not None and getattr(request, "headers", None):
            host = request.headers.get("host", host).rsplit(":", 1)[0]
        self.chat_url = f"http://{host}:{port}/"
        frame = (f'<iframe id="chat-frame" src="{self.chat_url}" style="width:100%;height:820px;border:0">'
                 "</iframe>")
        return frame, f"chat with **{adapter or 'base'}** at {self.chat_url}"

    def close_chat(self) -> str:
        if self.chat is not None and self.chat.poll() is None:
            self.chat.terminate()
            try:
                self.chat.wait(15)
            except subprocess.TimeoutExpired:
                self.chat.kill()
        self.chat = None
        return "chat closed"

    # -- Export tab -------------------------------------------------------------------------
    def merge(self, adapter: str, out: str) -> str:
        from ...tools.merge import merge_adapters

        try:
            folder = self.guard.resolve(adapter, what="adapter")
            dest = self.guard.resolve(out or f"{adapter}-merged", write=True, what="output folder")
            with self._lock:
                merged = merge_adapters(None, [str(folder)], dest, force=True)
        except _user_errors() as e:
            return f"error: {e}"
        size = sum(f.stat().st_size for f in merged.iterdir() if f.is_file()) / 2**20
        return f"merged into `{self.rel(merged)}` ({size:.1f} MiB)"

    def gguf(self, adapter: str, gguf_type: str, out: str) -> str:
        from ...tools.gguf import export_gguf

        try:
            folder = self.guard.resolve(adapter, what="adapter")
            dest = self.guard.resolve(out or f"{adapter}.{gguf_type}.gguf", write=True, what="output file")
            with self._lock:
                path = export_gguf(None, dest, adapters=[str(folder)], gguf_type=gguf_type)
        except _user_errors() as e:
            return f"error: {e}"
        return f"wrote `{self.rel(path)}` ({gguf_type}, {path.stat().st_size / 2**20:.1f} MiB)"
