"""``chinese-vicuna board``: the whole workflow in one Gradio app (model, data, train, evaluate, chat, export).

Every tab calls the code the CLI runs: ``data inspect``'s renderer, ``chinese-vicuna train`` as a
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
TEMPLATES = ("alpaca", "vicuna-chat", "auto")
OPEN_GROUPS = ("lora", "train")
"""Config groups shown unfolded in the Train tab (model and data keys are set from their own tabs)."""


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


def _field(spec: FieldSpec):
    import gradio as gr

    common = dict(label=spec.key, info=spec.doc or None, elem_id=f"cfg-{spec.key}")
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=spec.default_text, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default_text, **common)
    if spec.kind in ("int", "float") and not spec.optional:
        return gr.Number(value=spec.default_text, precision=0 if spec.kind == "int" else None, **common)
    return gr.Textbox(value=spec.default_text, lines=1, **common)


def build_board(board: Board):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    specs = board.specs
    samples = [f for f in board.data_files() if f.startswith("data/samples/")]
    default_data = [f for f in samples if f.endswith("instruct.jsonl")][:1]
    presets = sorted(board.rel(p) for p in (board.workdir / "configs").glob("*.yaml"))
    with gr.Blocks(title="chinese-vicuna board", analytics_enabled=False) as demo:
        gr.Markdown("### chinese-vicuna board · train, watch, evaluate, chat, export")
        fields: dict[str, object] = {}
        with gr.Tabs():
            with gr.Tab("Model", elem_id="tab-model"):
                base = gr.Dropdown(board.model_choices(), value=EMBEDDED, allow_custom_value=True,
                                   label="Base model (a local folder, .gguf file or hub id may be typed)",
                                   elem_id="model-base")
                with gr.Row():
                    quant = gr.Radio(["none", "4bit", "8bit"], value="none", label="Quantization (4bit = QLoRA)",
                                     elem_id="model-quantization")
                    template = gr.Radio(list(TEMPLATES), value="alpaca", label="Prompt template",
                                        elem_id="model-template")
                info_btn = gr.Button("Show size", elem_id="model-info-btn")
                info = gr.Markdown(elem_id="model-info")
            with gr.Tab("Data", elem_id="tab-data"):
                files = gr.CheckboxGroup(board.data_files(), value=default_data, label="Data files",
                                         elem_id="data-files")
                with gr.Row():
                    typed = gr.Textbox(label="Add a file by path", placeholder="data/my.jsonl", scale=4,
                                       elem_id="data-path")
                    add = gr.Button("Add", scale=1, elem_id="data-add")
                    up = gr.File(label="Upload", file_types=list(DATA_SUFFIXES), scale=2, elem_id="data-upload")
                with gr.Row():
                    fmt = gr.Dropdown(["auto", "alpaca", "vicuna-chat", "sharegpt", "openai", "text"], value="auto",
                                      label="Format", elem_id="data-format")
                    inspect_btn = gr.Button("Inspect", variant="primary", elem_id="data-inspect")
                data_msg = gr.Markdown(elem_id="data-error")
                preview = gr.HTML(elem_id="data-preview")
                stats = gr.Markdown(elem_id="data-stats")
            with gr.Tab("Train", elem_id="tab-train"):
                with gr.Row():
                    preset = gr.Dropdown(presets, value=None, label="Preset", elem_id="train-preset", scale=3)
                    load = gr.Button("Load preset", scale=1, elem_id="train-load")
                groups: dict[str, list[FieldSpec]] = {}
                for s in specs:
                    groups.setdefault(s.group, []).append(s)
                for group, members in groups.items():
                    with gr.Accordion(f"{group} ({len(members)} keys)", open=group in OPEN_GROUPS):
                        for i in range(0, len(members), 3):
                            with gr.Row():
                                for s in members[i : i + 3]:
                                    fields[s.key] = _field(s)
                form = [fields[k] for k in board.keys]
                cmd = gr.Code(board.command(*[s.default_text for s in specs]), language="shell",
                              label="Command line (the same run from a terminal)", elem_id="train-command")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="train-start")
                    stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                    resume = gr.Button("Resume", elem_id="train-resume")
                train_msg = gr.Markdown(elem_id="train-message")
                with gr.Column(elem_id="run-monitor"):
                    runs0 = [board.rel(d) for d in board.runs.folders()]
                    run = gr.Dropdown(runs0, value=runs0[0] if runs0 else None, label="Run", allow_custom_value=True,
                                      elem_id="run-select")
                    status = gr.Markdown(elem_id="run-status")
                    plot = gr.LinePlot(None, x="step", y="loss",
                                       color="series", title="loss", height=280, elem_id="loss-plot")
                    trackers = gr.Markdown(elem_id="run-trackers")
                    log = gr.Code(label="Log (tail)", elem_id="run-log", lines=12, max_lines=12)
                    table = gr.Dataframe(headers=["run", "state", "step", "loss", "val loss", "tokens/s", "ETA",
                                                  "checkpoints", "started from"], value=board.runs_table(),
                                         interactive=False, label="Runs", elem_id="runs")
            with gr.Tab("Evaluate", elem_id="tab-eval"):
                eval_adapters = gr.CheckboxGroup(board.adapters(), label="Adapters (compared with the base)",
                                                 elem_id="eval-adapters")
                with gr.Row():
                    prompts = gr.Textbox("data/samples/heldout.jsonl", label="Prompts (JSONL of instruction/input)",
                                         elem_id="eval-prompts", scale=3)
                    limit = gr.Number(3, precision=0, label="Prompts", elem_id="eval-limit")
                    max_new = gr.Number(48, precision=0, label="Max new tokens", elem_id="eval-max-new")
                compare_btn = gr.Button("Compare answers", variant="primary", elem_id="eval-compare")
                eval_msg = gr.Markdown(elem_id="eval-message")
                answers = gr.Dataframe(label="Same prompts, greedy decoding", wrap=True, elem_id="eval-answers")
                with gr.Row():
                    ppl_data = gr.Textbox("data/samples/pretrain.txt", label="Perplexity text", elem_id="eval-ppl-data")
                    ppl_btn = gr.Button("Perplexity", elem_id="eval-ppl")
                ppl = gr.Markdown(elem_id="eval-ppl-result")
                with gr.Row():
                    bench = gr.Radio(["ceval", "cmmlu"], value="ceval", label="Benchmark", elem_id="eval-bench")
                    bench_data = gr.Textbox("data/samples/ceval", label="Benchmark folder", elem_id="eval-bench-data")
                    bench_limit = gr.Number(5, precision=0, label="Questions per subject", elem_id="eval-bench-limit")
                    bench_btn = gr.Button("Accuracy", elem_id="eval-bench-run")
                bench_out = gr.Markdown(elem_id="eval-bench-result")
            with gr.Tab("Chat", elem_id="tab-chat"):
                adapters0 = board.adapters()
                with gr.Row():
                    chat_adapter = gr.Dropdown([*adapters0, "base"], value=(adapters0 or ["base"])[0],
                                               label="Adapter", elem_id="chat-adapter", scale=3)
                    chat_open = gr.Button("Open chat", variant="primary", elem_id="chat-open", scale=1)
                    chat_close = gr.Button("Close chat", elem_id="chat-close", scale=1)
                chat_msg = gr.Markdown(elem_id="chat-message")
                chat_frame = gr.HTML(elem_id="chat-area")
            with gr.Tab("Export", elem_id="tab-export"):
                exp_adapter = gr.Dropdown(adapters0, value=adapters0[0] if adapters0 else None, label="Adapter",
                                          allow_custom_value=True, elem_id="export-adapter")
                with gr.Row():
                    merge_out = gr.Textbox(label="Merged model folder (default: ADAPTER-merged)",
                                           elem_id="export-merge-out")
                    merge_btn = gr.Button("Merge", elem_id="export-merge")
                with gr.Row():
                    gguf_type = gr.Dropdown(["f16", "bf16", "f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m"], value="q8_0",
                                            label="GGUF type", elem_id="export-type")
                    gguf_out = gr.Textbox(label="GGUF file (default: ADAPTER.TYPE.gguf)", elem_id="export-gguf-out")
                    gguf_btn = gr.Button("Export GGUF", variant="primary", elem_id="export-gguf")
                export_msg = gr.Markdown(elem_id="export-result")

        # -- wiring ------------------------------------------------------------------------
        quick = dict(show_progress="hidden")
        info_btn.click(board.model_info, [base, quant], info)
        base.change(lambda b: "" if b == EMBEDDED else b, base, fields["base_model"], **quick)
        quant.change(lambda q: q, quant, fields["quantization"], **quick)
        template.change(lambda t: t, template, fields["template"], **quick)
        files.change(lambda fs: ", ".join(fs or []), files, fields["data_path"], **quick)
        demo.load(lambda fs: ", ".join(fs or []), files, fields["data_path"], **quick)
        add.click(board.add_path, [typed, files], [files, data_msg])
        typed.submit(board.add_path, [typed, files], [files, data_msg])
        up.upload(board.upload, [up, files], [files, data_msg])
        inspect_btn.click(board.inspect, [files, fmt, template, base, fields["cutoff_len"]],
                          [preview, stats, data_msg])
        for c in form:
            c.change(board.command, form, cmd, **quick)
        load.click(board.load_preset, preset, form)
        start.click(board.start, form, [train_msg, run])
        stop.click(board.stop, run, train_msg, queue=False)
        resume.click(board.resume, run, train_msg)
        run.change(board.run_status, run, [status, plot, log, trackers], **quick)

        # The page's lists follow the run folders, but a value is only set when the lists change (a new run
        # or adapter appeared: it becomes the selection) or nothing is selected. Setting values every tick
        # would undo a click made while the tick was in flight.
        seen = gr.State(None)

        def tick(selected, last):
            runs = [board.rel(d) for d in board.runs.folders()]
            adapters = board.adapters()
            selected = selected or (runs[0] if runs else None)
            line, df, tail, links = board.run_status(selected)
            rows = board.runs_table()
            lists = (tuple(runs), tuple(adapters), rows)
            if lists[:2] == (last or (None, None))[:2]:
                lists_out = [gr.skip()] * 4
            else:
                new_run = next((r for r in runs if last is None or r not in last[0]), None)
                new_adapter = next((a for a in adapters if last is None or a not in last[1]), None)
                lists_out = [
                    gr.update(choices=runs, value=new_run) if new_run and last is not None
                    else gr.update(choices=runs),
                    gr.update(choices=adapters),
                    gr.update(choices=[*adapters, "base"], value=new_adapter) if new_adapter
                    else gr.update(choices=[*adapters, "base"]),
                    gr.update(choices=adapters, value=new_adapter) if new_adapter else gr.update(choices=adapters),
                ]
            run_out, eval_out, chat_out, exp_out = lists_out
            table_out = gr.skip() if last is not None and rows == last[2] else rows  # redraw only on change
            return table_out, run_out, line, df, tail, links, eval_out, chat_out, exp_out, lists

        timer = gr.Timer(1.0)
        timer.tick(tick, [run, seen],
                   [table, run, status, plot, log, trackers, eval_adapters, chat_adapter, exp_adapter, seen],
                   show_progress="hidden", concurrency_id="tick", concurrency_limit=1)
        heavy = dict(concurrency_id="model", concurrency_limit=1)
        compare_btn.click(board.compare, [eval_adapters, prompts, limit, max_new, base], [answers, eval_msg], **heavy)
        ppl_btn.click(board.perplexity, [eval_adapters, ppl_data, base], ppl, **heavy)
        bench_btn.click(board.benchmark, [eval_adapters, bench, bench_data, bench_limit, base], bench_out, **heavy)
        chat_open.click(board.open_chat, chat_adapter, [chat_frame, chat_msg])
        chat_close.click(lambda: ("", board.close_chat()), None, [chat_frame, chat_msg])
        merge_btn.click(board.merge, [exp_adapter, merge_out], export_msg, **heavy)
        gguf_btn.click(board.gguf, [exp_adapter, gguf_type, gguf_out], export_msg, **heavy)
    return demo


def launch(board: Board, port: int = 7861) -> int:
    """Serve the board until Ctrl-C / SIGTERM; training runs it started keep running."""
    from ...chat.webui import serve_until_stopped

    demo = build_board(board)
    demo.queue(max_size=64)
    serve_until_stopped(demo, host=board.host, port=port, auth=board.auth, on_exit=board.close_chat,
                        banner=f"board at http://{board.host}:{port} (Ctrl-C stops the board; training runs keep going)")
    return 0
