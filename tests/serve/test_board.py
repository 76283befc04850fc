"""``chinese-vicuna board``: path safety, the generated form, run discovery, handlers, and the page in Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT

from chinese_vicuna.config import config_fields, load_config
from chinese_vicuna.serve.board.app import Board
from chinese_vicuna.serve.board.form import command_line, field_specs, preset_values, to_argv
from chinese_vicuna.serve.board.paths import PathGuard, PathRefused
from chinese_vicuna.serve.board.runs import RunManager

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "tests" / "artifacts"


# -- path safety -------------------------------------------------------------------------------
@pytest.fixture
def guard(tmp_path) -> PathGuard:
    work, data, out, outside = (tmp_path / n for n in ("work", "shared-data", "runs", "outside"))
    for d in (work, data, out, outside):
        d.mkdir()
    (outside / "secret.txt").write_text("secret")
    (work / "escape").symlink_to(outside)  # a link inside the workdir pointing out of it
    return PathGuard(work, data_roots=[data], output_roots=[out])


def test_paths_inside_the_roots_are_resolved(guard, tmp_path):
    assert guard.resolve("data/x.jsonl") == tmp_path / "work" / "data" / "x.jsonl"
    assert guard.resolve(str(tmp_path / "shared-data" / "a.json")) == tmp_path / "shared-data" / "a.json"
    assert guard.resolve(str(tmp_path / "runs" / "r1"), write=True) == tmp_path / "runs" / "r1"
    assert guard.resolve("outputs/r2", write=True) == tmp_path / "work" / "outputs" / "r2"
    assert guard.show(tmp_path / "work" / "outputs" / "r2") == "outputs/r2"


@pytest.mark.parametrize("typed, message", [
    ("../outside/secret.txt", "'..' is not allowed"),
    ("data/../../outside/secret.txt", "'..' is not allowed"),
    ("{tmp}/work/../outside/secret.txt", "'..' is not allowed"),
    ("/etc/passwd", "outside the folders the board may read"),
    ("{tmp}/outside/secret.txt", "outside the folders the board may read"),
    ("escape/secret.txt", "outside the folders the board may read"),  # symlinks are followed
    ("~/.ssh/id_rsa", "outside the folders the board may read"),
    ("", "empty path"),
])
def test_typed_paths_outside_the_roots_are_refused(guard, tmp_path, typed, message):
    with pytest.raises(PathRefused, match=re.escape(message)):
        guard.resolve(typed.format(tmp=tmp_path), what="data file")


def test_data_roots_are_read_only(guard, tmp_path):
    with pytest.raises(PathRefused, match="outside the folders the board may write"):
        guard.resolve(str(tmp_path / "shared-data" / "out"), write=True)


# -- the form ----------------------------------------------------------------------------------
def test_the_form_has_every_config_key_and_its_command_line_is_the_preset():
    specs = field_specs()
    assert [s.key for s in specs] == list(config_fields())  # keys added to config.py appear with no change here
    by_key = {s.key: s for s in specs}
    assert by_key["quantization"].kind == "choice" and by_key["quantization"].choices == ("none", "4bit", "8bit")
    assert by_key["lora_r"].kind == "int" and by_key["lora_r"].doc == "LoRA rank."
    assert by_key["packing"].kind == "bool" and by_key["data_path"].kind == "list"
    values = preset_values(specs, ROOT / "configs" / "demo.yaml")
    argv = to_argv(specs, values)
    assert load_config(None, argv).flat() == load_config(ROOT / "configs" / "demo.yaml").flat()
    assert "--data_path data/samples/instruct.jsonl" in command_line(argv)
    assert "--lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in command_line(argv)
    assert to_argv(specs, [s.default_text for s in specs]) == []  # defaults are left out
    changed = [7.0 if s.key == "max_steps" else (True if s.key == "packing" else s.default_text) for s in specs]
    assert to_argv(specs, changed) == ["--packing", "true", "--max_steps", "7"]
    # an optional number (max_samples: None) is a text box: empty is None, a number is a flag
    assert by_key["max_samples"].default_text == ""
    changed = ["12" if s.key == "max_samples" else s.default_text for s in specs]
    assert to_argv(specs, changed) == ["--max_samples", "12"] and load_config(None, to_argv(specs, changed)).data.max_samples == 12


# -- handlers without a browser ------------------------------------------------------------------
@pytest.fixture
def board(tmp_path) -> Board:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    return Board(PathGuard(work, output_roots=[work / "outputs"]), [work / "outputs"])


def test_model_info_counts_parameters_and_refuses_paths(board, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(Board, "_plan", lambda self, base, q: [])  # the planner has its own tests
    shutil.copytree(tiny_model_dir, board.workdir / "models" / "tiny")
    info = board.model_info("models/tiny", "none")
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert info.startswith("**models/tiny**  \nLlamaForCausalLM · " + f"{n / 1e6:.1f} M parameters · float32")
    assert "models/tiny" in board.model_choices()
    assert board.model_info(str(tiny_model_dir), "none").startswith(f"error: base model: {tiny_model_dir}: outside")
    assert board.model_info("Qwen/Qwen2-0.5B", "4bit") == "**Qwen/Qwen2-0.5B**: a hub id (downloaded when training starts)"


def test_bad_records_show_file_line_errors(board):
    bad = board.workdir / "data" / "bad.jsonl"
    bad.write_text('{"instruction": "你好", "output": "好"}\n{"instruction": 3, "output": "x"}\n', encoding="utf-8")
    html, stats, error = board.inspect(["data/bad.jsonl"], "auto", "alpaca", None, 256)
    assert (html, stats) == ("", "")
    assert error.startswith(f"error: {bad}:2: ") and "instruction" in error
    assert board.inspect(["../bad.jsonl"], "auto", "alpaca", None, 256)[2] == (
        "error: data file: ../bad.jsonl: '..' is not allowed in paths typed into the board")


def test_inspect_renders_the_sample_and_statistics(board):
    shutil.copy(ROOT / "data" / "samples" / "instruct.jsonl", board.workdir / "data" / "instruct.jsonl")
    html, stats, msg = board.inspect(["data/instruct.jsonl"], "auto", "alpaca", None, 256)
    records = sum(1 for line in (ROOT / "data" / "samples" / "instruct.jsonl").open() if line.strip())
    assert msg == f"ok: {records} records" and stats.startswith(f"{records} records · tokens min / mean / max ")
    assert "### Response:" in html and "<pre" in html


def test_start_refuses_paths_outside_and_bad_config_before_starting(board):
    specs = board.specs
    values = {s.key: s.default_text for s in specs}

    def start(**changes):
        return board.start(*[changes.get(k, v) for k, v in values.items()])[0]

    assert start(output_dir="/tmp/elsewhere") == (
        f"error: output_dir: /tmp/elsewhere: outside the folders the board may write ({board.workdir}, "
        f"{board.workdir / 'outputs'})")
    assert start(data_path="data/../../x.jsonl").startswith("error: data_path: data/../../x.jsonl: '..' is not allowed")
    assert start(data_path="data/x.jsonl", batch_size=6.0, micro_batch_size=4.0) == (
        "error: batch_size (6) must be a multiple of micro_batch_size (4)")
    assert board.runs.procs == {}  # nothing was started


def test_evaluate_handlers_match_the_eval_functions(board, tiny_model_dir, tiny_adapter_dir):
    """Perplexity and compare in the page give what ``eval ppl`` / ``eval compare``'s functions give."""
    from chinese_vicuna.eval import compare as cmp
    from chinese_vicuna.eval.perplexity import perplexity
    from chinese_vicuna.generation.decode import GenArgs
    from chinese_vicuna.model.adapters import load_for_inference

    shutil.copytree(tiny_model_dir, board.workdir / "models" / "tiny")
    shutil.copytree(tiny_adapter_dir, board.workdir / "outputs" / "tuned")
    text = "今天天气很好，我们去公园散步吧。" * 8
    (board.workdir / "data" / "t.txt").write_text(text, encoding="utf-8")
    table = board.perplexity(["outputs/tuned"], "data/t.txt", "models/tiny").splitlines()
    assert table[:2] == ["| model | perplexity | tokens | bits/char |", "|---|---|---|---|"]
    for row, adapters in zip(table[2:], ([], [str(board.workdir / "outputs" / "tuned")]), strict=True):
        model, tok, _ = load_for_inference(str(board.workdir / "models" / "tiny"), adapters)
        ref = perplexity(model, tok, text, window=256, stride=128, progress=False)
        name = "tuned" if adapters else "base"
        assert row == f"| {name} | {ref['ppl']:.3f} | {ref['scored_tokens']} | {ref['bits_per_char']:.3f} |"
    write_prompts = [{"instruction": "介绍一下杭州。", "input": ""}, {"instruction": "翻译", "input": "hello"}]
    (board.workdir / "data" / "p.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in write_prompts))
    df, msg = board.compare(["outputs/tuned"], "data/p.jsonl", 0, 6, None)
    assert msg == "compared 2 prompts: base, tuned" and list(df.columns) == ["prompt", "base", "tuned"]
    ref = cmp.compare([("介绍一下杭州。", ""), ("翻译", "hello")], [f"tuned={board.workdir / 'outputs' / 'tuned'}"],
                      None, GenArgs(max_new_tokens=6))
    assert list(df["base"]) == ref["base"] and list(df["tuned"]) == ref["tuned"] and list(df["prompt"]) == ["介绍一下杭州。", "翻译\nhello"]
    assert board.compare(["../a"], "data/p.jsonl", 0, 6, None)[1] == (
        "error: adapter: ../a: '..' is not allowed in paths typed into the board")


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "chinese_vicuna", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def tiny_train_args(model: Path, data: Path, out: str, **kw) -> list[str]:
    args = dict(base_model=model, data_path=data, output_dir=out, micro_batch_size=2, batch_size=4, cutoff_len=64,
                lora_r=4, lora_alpha=8, logging_steps=1, report_to="none", dtype="float32", max_steps=2)
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_runs_started_from_the_cli_are_listed(tmp_path, tiny_model_dir, alpaca_file):
    work = tmp_path / "work"
    work.mkdir()
    proc = cli("train", *tiny_train_args(tiny_model_dir, alpaca_file, "outputs/from-cli"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a run that died without writing its end (killed): its pid is gone
    dead = work / "outputs" / "killed"
    dead.mkdir()
    (dead / "status.json").write_text(json.dumps({"state": "running", "pid": 2**22 + 7, "step": 3,
                                                  "total_steps": 9, "started_at": 1, "updated_at": 2}))
    manager = RunManager(work, [work / "outputs"])
    runs = {r.path.name: r for r in manager.runs()}
    r = runs["from-cli"]
    assert (r.state, r.step, r.total, r.source, r.has_adapter, r.checkpoints) == ("finished", 2, 2, "cli", True, 1)
    assert r.loss is not None and r.loss > 0
    assert (runs["killed"].state, runs["killed"].step) == ("failed (process gone)", 3)
    board = Board(PathGuard(work, output_roots=[work / "outputs"]), [work / "outputs"])
    assert board.adapters() == ["outputs/from-cli"]
    line, df, tail, trackers = board.run_status("outputs/from-cli")
    assert line.startswith("**outputs/from-cli** · finished · step 2/2 · loss ")
    assert list(df["series"]) == ["train", "train"] and list(df["step"]) == [1.0, 2.0]
    assert tail == "(started from the command line: its output is in that terminal)"


def wait_for(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


@pytest.mark.slow  # ~45 s on a busy CPU (two trainer starts); the trainer-level stop/resume tests run by default
def test_stop_then_resume_from_the_board(tmp_path, tiny_model_dir, alpaca_file):
    """Stop = SIGTERM: the trainer writes a checkpoint and exits; Resume (at once) continues from it."""
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    shutil.copy(alpaca_file, work / "train.jsonl")
    board = Board(PathGuard(work, output_roots=[work / "outputs"]), [work / "outputs"])
    values = {s.key: s.default_text for s in board.specs}
    values.update(base_model="models/tiny", data_path="train.jsonl", output_dir="outputs/r", max_steps=100000,
                  micro_batch_size=2, batch_size=2, cutoff_len=32, report_to="none", logging_steps=1,
                  save_steps=100000, dtype="float32")
    folder = work / "outputs" / "r"
    try:
        assert board.start(*values.values())[0].startswith("started: `chinese-vicuna train --base_model models/tiny")
        wait_for(lambda: board.runs.run(folder).state == "running" and board.runs.run(folder).step >= 1,
                 what="the run to train")
        assert board.stop("outputs/r") == "asked r to stop: it saves a checkpoint after the current step"
        stopped = wait_for(lambda: (r := board.runs.run(folder)).state == "stopped" and r, what="the stop")
        assert stopped.checkpoints == 1 and not stopped.has_adapter
        assert board.resume("outputs/r") == "resuming outputs/r from its newest checkpoint"  # the stopped one may still be exiting
        log = folder / "train.log"
        wait_for(lambda: f"resumed from {folder / f'checkpoint-{stopped.step}'} at step {stopped.step}" in log.read_text(),
                 what="the resumed run")
        assert board.runs.run(folder).state in ("starting", "running")
        assert board.resume("outputs/r") == f"error: {folder}: a run is already training in this folder"
    finally:
        for proc in board.runs.procs.values():
            proc.kill()
            proc.wait(10)


# -- the page in a browser -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BoardProcess:
    def __init__(self, work: Path):
        self.work, self.port = work, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.log = work / "board.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "chinese_vicuna", "board", "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"board exited with {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"board not up after 120 s:\n{self.text()}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def close(self) -> int:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.returncode


def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(ROOT / "data" / "samples", work / "data" / "samples")
    shutil.copytree(ROOT / "configs", work / "configs")
    return work


def end_training_processes(work: Path) -> None:
    """Runs live in their own sessions (they outlive the board): end any the test left behind."""
    for status in work.glob("outputs/*/status.json"):
        pid = json.loads(status.read_text()).get("pid")
        if pid and json.loads(status.read_text()).get("state") == "running":
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def write_bad_records(work: Path) -> None:
    """data/bad.jsonl: a good record, then one whose instruction is not a string (line 2)."""
    (work / "data" / "bad.jsonl").write_text('{"instruction": "你好", "output": "好"}\n{"instruction": 3}\n',
                                             encoding="utf-8")


@contextlib.contextmanager
def board_page(work: Path):
    """A board serving ``work`` and a Chromium page open at it; afterwards the board must exit with 0."""
    from playwright.sync_api import sync_playwright

    board = BoardProcess(work)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(board.url)
                yield page
            finally:
                browser.close()
    finally:
        code = board.close()
        end_training_processes(work)
    assert code == 0, board.text()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def fill(page, key: str, value) -> None:
    field = page.locator(f"#cfg-{key} input, #cfg-{key} textarea").first
    field.fill(str(value))
    field.press("Enter" if key not in ("data_path",) else "Tab")


def open_group(page, group: str) -> None:
    page.locator("button.label-wrap, .label-wrap").filter(has_text=re.compile(rf"^{group} \(\d+ keys\)")).first.click()


def row(page, pattern: str):
    """The runs table's row whose cells, joined by spaces, match ``pattern``."""
    pattern = pattern.replace("/", r"\/")  # playwright writes the regex into a /.../ selector
    return page.locator("#runs").get_by_role("row", name=re.compile(f"^{pattern}$"))


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"board-{name}.png"), full_page=True)


def check_data_tab(page, expect, screenshot: bool = True) -> None:
    """A typed path outside the roots is refused; a bad record's file:line shows in the page."""
    tab(page, "Data")
    msg = page.locator("#data-error")
    page.locator("#data-path input, #data-path textarea").first.fill("../../etc/passwd")
    page.locator("#data-add").click()
    expect(msg).to_contain_text("'..' is not allowed in paths typed into the board", timeout=30_000)
    page.locator("#data-path input, #data-path textarea").first.fill("/etc/passwd")
    page.locator("#data-add").click()
    expect(msg).to_contain_text("/etc/passwd: outside the folders the board may read", timeout=30_000)
    page.locator("#data-path input, #data-path textarea").first.fill("data/bad.jsonl")
    page.locator("#data-add").click()
    expect(msg).to_have_text("added data/bad.jsonl", timeout=30_000)
    page.locator("#data-inspect").click()
    expect(msg).to_contain_text("bad.jsonl:2: ", timeout=60_000)
    page.locator("#data-files label").filter(has_text="data/bad.jsonl").click()  # untick it
    page.locator("#data-inspect").click()
    expect(msg).to_contain_text(re.compile(r"ok: \d+ records"), timeout=60_000)
    expect(page.locator("#data-preview")).to_contain_text("### Response:")
    if screenshot:
        shot(page, "data")


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")
def test_board_in_a_browser_tiny_model(tmp_path, tiny_model_dir, alpaca_file):
    """Fast: a tiny model picked in the page, refused paths and a bad record's file:line in the page, a
    2-step run to its end with train + validation points, and a run started from the CLI listed."""
    from playwright.sync_api import expect

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(alpaca_file, work / "data" / "train.jsonl")
    write_bad_records(work)
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    proc = cli("train", *tiny_train_args(work / "models" / "tiny", "data/train.jsonl", "outputs/from-cli"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with board_page(work) as page:
        base = page.locator("#model-base input")
        expect(base).to_have_value("embedded: SmolLM2-135M-Instruct", timeout=60_000)
        base.fill("models/tiny")
        base.press("Enter")
        page.locator("#model-info-btn").click()
        expect(page.locator("#model-info")).to_contain_text("LlamaForCausalLM · ", timeout=60_000)
        tab(page, "Data")
        page.locator("#data-files label").filter(has_text="data/train.jsonl").click()
        check_data_tab(page, expect, screenshot=False)

        tab(page, "Train")
        status = page.locator("#run-status")
        expect(page.locator("#runs")).to_contain_text("outputs/from-cli")
        expect(row(page, r"outputs/from-cli finished 2/2 [\d.]+ – \d+ – 1 cli")).to_have_count(1)
        open_group(page, "data")
        for key, value in dict(max_steps=2, micro_batch_size=2, batch_size=4, logging_steps=1, val_size=4,
                               eval_steps=1, cutoff_len=64, output_dir="outputs/tiny",
                               report_to="none").items():
            fill(page, key, value)
        expect(page.locator("#train-command")).to_contain_text("--base_model models/tiny")
        page.locator("#train-start").click()
        expect(status).to_contain_text(re.compile(r"outputs/tiny · finished · step 2/2 .* 4 loss points"),
                                       timeout=120_000)
        expect(row(page, r"outputs/tiny finished 2/2 [\d.]+ [\d.]+ \d+ – 1 board")).to_have_count(1)
        assert (work / "outputs" / "tiny" / "adapter_model.safetensors").exists()
        assert "adapter written to outputs/tiny" in (work / "outputs" / "tiny" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")
def test_board_in_a_browser(tmp_path):
    """The whole workflow on the embedded SmolLM2: data, train (curve, finish), stop + resume, eval, chat, GGUF."""
    from playwright.sync_api import expect

    work = workdir(tmp_path)
    write_bad_records(work)
    with board_page(work) as page:
        expect(page.locator("#model-base input")).to_have_value("embedded: SmolLM2-135M-Instruct",
                                                                timeout=60_000)
        page.locator("#model-info-btn").click()
        expect(page.locator("#model-info")).to_contain_text("M parameters", timeout=60_000)
        shot(page, "model")
        check_data_tab(page, expect)

        tab(page, "Train")
        status, message = page.locator("#run-status"), page.locator("#train-message")
        open_group(page, "data")
        for key, value in dict(max_steps=2, micro_batch_size=4, batch_size=4, logging_steps=1, val_size=4,
                               eval_steps=1, cutoff_len=128, learning_rate=0.002, output_dir="outputs/run1",
                               report_to="none").items():
            fill(page, key, value)
        expect(page.locator("#train-command")).to_contain_text("--max_steps 2", timeout=10_000)
        expect(page.locator("#train-command")).to_contain_text("--data_path data/samples/instruct.jsonl")
        page.locator("#train-start").click()
        expect(message).to_contain_text("started: chinese-vicuna train --data_path data/samples/instruct.jsonl", timeout=30_000)
        expect(status).to_contain_text(re.compile(r"outputs/run1 · running · step 1/2 · loss [\d.]+ .* ETA \dm\d\ds"),
                                       timeout=300_000)
        expect(status).to_contain_text(re.compile(r"finished · step 2/2 .* 4 loss points"), timeout=300_000)
        expect(page.locator("#runs")).to_contain_text("outputs/run1")
        shot(page, "train")
        page.locator("#run-monitor").screenshot(path=str(ARTIFACTS / "board-monitor.png"))

        # Stop during a run leaves a checkpoint; Resume finishes it.
        fill(page, "max_steps", 3)
        fill(page, "eval_steps", 100)
        fill(page, "output_dir", "outputs/run2")
        page.locator("#train-start").click()
        expect(status).to_contain_text(re.compile(r"outputs/run2 · running · step 1/3"), timeout=300_000)
        page.locator("#train-stop").click()
        expect(message).to_contain_text("asked run2 to stop: it saves a checkpoint after the current step", timeout=10_000)
        expect(status).to_contain_text(re.compile(r"stopped · step [12]/3 .* 1 checkpoint\(s\)"),
                                       timeout=120_000)
        assert not (work / "outputs" / "run2" / "adapter_model.safetensors").exists()
        page.locator("#train-resume").click()
        expect(status).to_contain_text(re.compile(r"finished · step 3/3"), timeout=300_000)
        assert "resumed from" in (work / "outputs" / "run2" / "train.log").read_text()

        tab(page, "Evaluate")
        page.locator("#eval-adapters label").filter(has_text="outputs/run1").click()
        page.locator("#eval-limit input").fill("2")
        page.locator("#eval-max-new input").fill("16")
        page.locator("#eval-compare").click()
        expect(page.locator("#eval-message")).to_have_text("compared 2 prompts: base, run1", timeout=240_000)
        expect(page.locator("#eval-answers")).to_contain_text("介绍一下杭州西湖。")
        page.locator("#eval-bench-limit input").fill("2")
        page.locator("#eval-bench-run").click()
        # 3 subjects x 2 questions of the bundled C-Eval sample, for the base and the adapter
        expect(page.locator("#eval-bench-result")).to_contain_text(
            re.compile(r"base\s+[\d.]+%\s+6\s+run1\s+[\d.]+%\s+6"), timeout=240_000)
        shot(page, "evaluate")

        tab(page, "Chat")
        expect(page.locator("#chat-adapter input")).to_have_value("outputs/run2")  # the newest adapter
        page.locator("#chat-open").click()
        expect(page.locator("#chat-message")).to_contain_text("chat with outputs/run2 at http://127.0.0.1:",
                                                              timeout=240_000)
        frame = page.frame_locator("#chat-frame")
        expect(frame.locator("#status")).to_have_text("ready", timeout=60_000)
        frame.locator("#message textarea").fill("你好")
        frame.locator("#message textarea").press("Enter")
        expect(frame.locator("#status")).to_contain_text(re.compile(r"(finished|max new tokens reached): \d+ tokens"),
                                                         timeout=120_000)
        assert frame.locator("#chat [data-testid='bot']").inner_text().strip()
        shot(page, "chat")

        tab(page, "Export")
        page.locator("#export-adapter input").fill("outputs/run1")
        page.locator("#export-adapter input").press("Enter")
        page.locator("#export-gguf").click()
        expect(page.locator("#export-result")).to_contain_text(
            re.compile(r"wrote outputs/run1\.q8_0\.gguf \(q8_0, [\d.]+ MiB\)"), timeout=300_000)
        gguf = work / "outputs" / "run1.q8_0.gguf"
        assert gguf.read_bytes()[:4] == b"GGUF"
        shot(page, "export")
