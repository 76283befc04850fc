"""The Gradio web UI: its handlers in-process, then the real server driven by headless Chromium."""

from __future__ import annotations

import copy
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

from chinese_vicuna.chat.session import ChatSession
from chinese_vicuna.chat.webui import CONTROL_NAMES, WebChat, messages
from chinese_vicuna.generation.decode import GenArgs
from chinese_vicuna.generation.engine import Engine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter_dir) -> Engine:
    return Engine.load(str(tiny_model_dir), [f"a={tiny_adapter_dir}", f"b={tiny_adapter_dir}"])


def controls(**changes) -> tuple:
    """Control values as the browser sends them (sliders give floats)."""
    values = dict(temperature=0.7, top_p=0.9, top_k=40.0, num_beams=1.0, max_new_tokens=8.0, min_new_tokens=0.0,
                  repetition_penalty=1.1, max_memory=0.0, do_sample=False, template="alpaca", system="", adapter="a")
    values.update(changes)
    return tuple(values[name] for name in CONTROL_NAMES)


def test_respond_streams_and_applies_the_controls(engine, tmp_path):
    chat = WebChat(ChatSession(engine, gen=GenArgs(max_new_tokens=8)), tmp_path)
    session = chat.new_session()
    outs = list(chat.respond("你好", session, *controls(template="vicuna-chat", system="你是助手。", adapter="b")))
    first, last = outs[0], outs[-1]
    assert first[0][0] == {"role": "user", "content": "你好"} and first[0][1]["role"] == "assistant"
    assert first[2] == ""  # the message box is emptied as soon as the message is taken
    reply = session.history[0][1]
    assert last[0] == messages([("你好", reply)]) and reply
    assert re.fullmatch(r"(max new tokens reached|finished): [1-8] tokens \(prompt \d+\)", last[3]), last[3]
    assert (session.template.name, session.system, session.adapter) == ("vicuna-chat", "你是助手。", "b")
    assert session.gen.top_k == 40 and isinstance(session.gen.top_k, int) and session.max_memory is None
    saved = json.loads(Path(last[4]).read_text(encoding="utf-8"))
    assert saved["history"] == [{"user": "你好", "assistant": reply}] and saved["adapter"] == "b"
    # Beam search through the same path; Regenerate replaces the last reply.
    outs = list(chat.regenerate(session, *controls(num_beams=3.0, template="vicuna-chat", adapter="b")))
    assert len(session.history) == 1 and outs[-1][0] == messages(session.history)
    # Each tab's session is its own; a copy shares the engine, not the history.
    other = copy.deepcopy(session)
    assert other.engine is engine and other.history == session.history and other.history is not session.history
    assert chat.new_session().history == []


@pytest.mark.filterwarnings("ignore:(type a message|nothing to regenerate)")  # gr.Warning outside a page
def test_stop_undo_clear_and_refusals(engine, tmp_path):
    chat = WebChat(ChatSession(engine), tmp_path)
    session = chat.new_session()
    stream = chat.respond("写一首很长的诗", session, *controls(max_new_tokens=400.0, min_new_tokens=400.0))
    next(stream)
    chat.stop(session)  # what the Stop button does, from another request
    last = list(stream)[-1]
    tokens = int(re.match(r"stopped: (\d+) tokens", last[3]).group(1))
    assert tokens < 400 and len(session.history) == 1
    assert chat.undo(session)[:3] == ([], session, "removed the last turn")
    assert chat.undo(session)[2] == "nothing to undo"
    list(chat.respond("你好", session, *controls()))
    assert chat.clear(session)[0] == [] and session.history == []
    out = list(chat.respond("   ", session, *controls()))[-1]
    assert out[3] == "error: type a message first"
    out = list(chat.regenerate(session, *controls()))[-1]
    assert out[3] == "error: nothing to regenerate: the history is empty"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    """A real `chinese-vicuna webui` on 127.0.0.1 (8k-context copy of the tiny model: long replies)."""
    d = tmp_path_factory.mktemp("webui")
    model = d / "tiny-long"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["max_position_embeddings"] = 8192
    (model / "config.json").write_text(json.dumps(cfg))
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "chinese_vicuna", "webui", "--model", str(model), "--adapter",
           f"a={tiny_adapter_dir}", "--adapter", f"b={tiny_adapter_dir}", "--port", str(port),
           "--max-new-tokens", "3000", "--min-new-tokens", "3000"]
    log = d / "webui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"webui exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"webui not up after 180s:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]  # SIGTERM stops it cleanly


def saved_chat(page) -> dict:
    with page.expect_download() as download:
        page.locator("#save").click()
    return json.loads(Path(download.value.path()).read_text(encoding="utf-8"))


def set_slider(page, name: str, value: int) -> None:
    field = page.locator(f"#set-{name} input[data-testid='number-input']")
    field.fill(str(value))
    field.press("Enter")


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install -y chromium)")
def test_webui_in_a_browser(webui, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    message = "你好，请写一首关于春天的长诗。"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(webui)
            status, box = page.locator("#status"), page.locator("#message textarea")
            users, bots = page.locator("#chat [data-testid='user']"), page.locator("#chat [data-testid='bot']")
            expect(status).to_have_text("ready", timeout=60_000)
            box.fill(message)
            box.press("Enter")
            expect(users).to_have_text([message], timeout=30_000)
            # The reply streams in: its text keeps growing while the status says so.
            length = "() => (document.querySelector(\"#chat [data-testid='bot']\")?.innerText || '').length"
            page.wait_for_function(f"({length})() > 20", timeout=30_000)
            before = page.evaluate(length)
            page.wait_for_function(f"({length})() > {before + 50}", timeout=30_000)
            expect(status).to_contain_text("generating…")
            page.locator("#stop").click()
            expect(status).to_contain_text("stopped:", timeout=30_000)
            tokens = int(re.search(r"stopped: (\d+) tokens", status.inner_text()).group(1))
            assert 0 < tokens < 3000
            shown = page.evaluate(length)
            time.sleep(0.5)
            assert page.evaluate(length) == shown  # nothing more arrives after Stop
            chat = saved_chat(page)
            assert [t["user"] for t in chat["history"]] == [message] and chat["history"][0]["assistant"]
            page.screenshot(path=str(tmp_path / "webui-stopped.png"), full_page=True)

            page.locator("#undo").click()
            expect(status).to_have_text("removed the last turn")
            expect(users).to_have_count(0)
            expect(bots).to_have_count(0)

            # The controls reach the session: 8 new tokens, the vicuna-chat template, adapter b.
            set_slider(page, "max_new_tokens", 8)
            set_slider(page, "min_new_tokens", 0)
            page.locator("#set-template").get_by_text("vicuna-chat").click()
            box.fill("一加一等于几？")
            page.locator("#send").click()
            expect(status).to_contain_text("max new tokens reached: 8 tokens", timeout=30_000)
            expect(users).to_have_text(["一加一等于几？"])
            expect(bots).to_have_count(1)
            chat = saved_chat(page)
            assert chat["gen"]["max_new_tokens"] == 8 and chat["template"] == "vicuna-chat"
            assert [t["user"] for t in chat["history"]] == ["一加一等于几？"]
            shot = tmp_path / "webui.png"
            page.screenshot(path=str(shot), full_page=True)
            artifacts = ROOT / "tests" / "artifacts"
            artifacts.mkdir(exist_ok=True)
            shutil.copy(shot, artifacts / "webui.png")

            page.locator("#clear").click()
            expect(status).to_have_text("history cleared")
            expect(users).to_have_count(0)
            assert saved_chat(page)["history"] == []
        finally:
            browser.close()
