"""The terminal chat: line reading and commands in-process, then the real program in a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys

import pexpect
import pytest
import torch
from helpers import ROOT

from chinese_vicuna.chat.repl import CONTINUE, PROMPT, Repl, read_message
from chinese_vicuna.chat.session import ChatSession
from chinese_vicuna.cli import main
from chinese_vicuna.generation.decode import GenArgs
from chinese_vicuna.generation.engine import Engine


def reader(lines: list[str]):
    """An ``input``-like function over canned lines; raises EOFError (Ctrl-D) when they run out."""
    feed = iter(lines)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    read.prompts = prompts
    return read


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with an 8k context, so that a reply can be thousands of tokens long."""
    d = tmp_path_factory.mktemp("tiny-long") / "tiny-long"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 8192
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread (a shared 2-core machine); a dumb terminal keeps readline's escapes out.
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", TERM="dumb",
               LC_ALL="C.UTF-8", LANG="C.UTF-8")
    return env


def _terminal_signals() -> None:
    # A user's terminal delivers Ctrl-C; a runner started as a background job of a script has SIGINT
    # ignored, and an ignored signal stays ignored in its children (Python then installs no handler).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "chinese_vicuna", "chat", *args], cwd=str(ROOT), env=child_env(),
                         encoding="utf-8", timeout=60, dimensions=(40, 300), preexec_fn=_terminal_signals)


def test_read_message_joins_continued_lines_and_blocks():
    assert read_message(reader(["你好"])) == "你好"
    assert read_message(reader(["第一行\\", "第二行\\", "第三行"])) == "第一行\n第二行\n第三行"
    read = reader(['"""', "def f():", "    return 1", '"""'])
    assert read_message(read) == "def f():\n    return 1"
    assert read.prompts == [PROMPT, CONTINUE, CONTINUE, CONTINUE]
    assert read_message(reader(['"""开头', "结尾"""'"""'])) == "开头\n结尾"
    assert read_message(reader(['"""一行"""'])) == "一行"
    with pytest.raises(EOFError):
        read_message(reader([]))


def test_flag_defaults_match_genargs_and_unwired_backend_is_a_clear_error(capsys):
    from chinese_vicuna.cli import build_parser
    from chinese_vicuna.generation.commands import gen_args

    assert gen_args(build_parser().parse_args(["chat"])) == GenArgs()
    assert main(["chat", "--backend", "llama.cpp"]) == 2
    assert "error: --backend llama.cpp" in capsys.readouterr().err


def test_commands_in_process(tiny_model_dir, tiny_adapter_dir, tmp_path):
    engine = Engine.load(str(tiny_model_dir), [f"a={tiny_adapter_dir}"])
    session = ChatSession(engine, gen=GenArgs(max_new_tokens=4))
    out = io.StringIO()
    saved = tmp_path / "c.json"
    lines = ["/help", "/set", "/set top_k 1.5", "/set top_k", "/set temprature 1", "/system 你是助手。", "/system",
             "你好", "//set 不是命令", "/history", "/adapter base", "/undo", "/undo", "/undo", "/regen",
             "/nope", f"/save {saved}", "/clear", f"/load {saved}", "/load /nonexistent.json"]
    assert Repl(session, out, reader(lines)).run() == 0  # the lines run out: Ctrl-D leaves cleanly
    text = out.getvalue()
    for want in ["/regen                answer the last message again", "  temperature = 0.7",
                 "error: top_k: expected int, got '1.5'", "error: usage: /set NAME VALUE",
                 "did you mean temperature", "system: 你是助手。", "[1] User: 你好",
                 "[2] User: /set 不是命令", "adapter: base (loaded: a, base)", "removed: /set 不是命令",
                 "removed: 你好", "nothing to undo", "error: nothing to regenerate",
                 "unknown command /nope", f"saved 0 turns to {saved}", "loaded 0 turns", "error: [Errno 2]",
                 "[max_new_tokens (4) reached]", "bye"]:
        assert want in text, want
    assert session.system == "你是助手。" and session.adapter == "base"


def expected_replies(model_dir, adapter_dir, messages: list[str]) -> list[str]:
    """What the chat must print, from the same session logic in-process (one thread, like the child)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        session = ChatSession(Engine.load(str(model_dir), [str(adapter_dir)]), gen=GenArgs(max_new_tokens=8))
        return [session.send(m).run() for m in messages]
    finally:
        torch.set_num_threads(threads)


def turn(child: pexpect.spawn, line: str | None = None) -> str:
    """Send a line (if any); return everything printed until the next prompt, newlines normalised."""
    if line is not None:
        child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n")


def test_terminal_chat_in_a_pty(long_model_dir, tiny_adapter_dir, tmp_path):
    first, second, multi, block = "你好，请介绍一下长城。", "它有多长？", "第一行\n第二行", "行一\n行二"
    want = expected_replies(long_model_dir, tiny_adapter_dir, [first, second])
    child = spawn("--model", str(long_model_dir), "--adapter", str(tiny_adapter_dir), "--max-new-tokens", "8")
    try:
        child.expect_exact(PROMPT, timeout=180)
        assert "/help for commands" in child.before
        assert f"Assistant> {want[0]}\n" in turn(child, first)
        assert f"Assistant> {want[1]}\n" in turn(child, second)
        assert f"removed: {second}" in turn(child, "/undo")
        assert "temperature = 0.5" in turn(child, "/set temperature 0.5")
        # /regen answers the first message again (its history is empty again): greedy gives the same reply.
        assert f"Assistant> {want[0]}\n" in turn(child, "/regen")
        # Multi-line input: a trailing backslash, then a """ block.
        child.sendline("第一行\\")
        child.expect_exact(CONTINUE)
        assert "Assistant> " in turn(child, "第二行")
        for line in ['"""', "行一", "行二"]:
            child.sendline(line)
            child.expect_exact(CONTINUE)
        assert "Assistant> " in turn(child, '"""')
        saved = tmp_path / "chat.json"
        assert f"saved 3 turns to {saved}" in turn(child, f"/save {saved}")
        data = json.loads(saved.read_text(encoding="utf-8"))
        assert [t["user"] for t in data["history"]] == [first, multi, block]
        assert data["history"][0]["assistant"] == want[0].strip() and data["gen"]["temperature"] == 0.5
        # Ctrl-C during a long reply stops the reply, not the program.
        turn(child, "/set max_new_tokens 3000")
        turn(child, "/set min_new_tokens 3000")
        child.sendline("写一篇很长的文章")
        child.expect_exact("Assistant> ")
        child.expect(r"\S{20}")  # some of the reply is on screen
        child.sendcontrol("c")
        child.expect(r"\[stopped after (\d+) tokens\]", timeout=30)
        assert int(child.match.group(1)) < 3000
        turn(child)
        assert "[4] User: 写一篇很长的文章\n    Assistant: " in turn(child, "/history")
        child.sendline("/exit")
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_exits_cleanly(tiny_model_dir, tiny_adapter_dir):
    child = spawn("--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir))
    try:
        child.expect_exact(PROMPT, timeout=180)
        child.sendcontrol("c")
        child.expect_exact("bye", timeout=180)  # a bound, not a speed claim: a loaded CI machine is slow
        child.expect(pexpect.EOF, timeout=180)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and "Traceback" not in child.before


@pytest.mark.slow
def test_terminal_chat_with_the_embedded_smollm2():
    child = spawn("--max-new-tokens", "24", "--system", "You are a helpful assistant.")
    try:
        child.expect_exact(PROMPT, timeout=300)
        assert "template auto" in child.before
        out = turn(child, "你好！请用一句话介绍你自己。")
        reply = out.split("Assistant> ", 1)[1].split("\n", 1)[0].strip()
        assert len(reply) >= 5 and "\ufffd" not in reply
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
