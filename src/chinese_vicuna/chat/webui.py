"""Gradio chat UI on the same ``Engine`` + ``ChatSession`` as the terminal chat.

Every browser tab gets its own ``ChatSession`` (``gr.State``); they share one engine, whose lock
serialises generation. A reply is generated on a worker thread that always runs to its end (or to
Stop), so the engine lock is released even when a tab closes mid-reply; the Gradio handler only
polls the stream and redraws, which also throttles the updates the browser has to render.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..data.templates import TEMPLATES
from .session import ChatError, ChatSession

REFRESH_S = 0.05
"""Redraw interval while a reply streams (the model may produce tokens much faster)."""
SETTLE_S = 30.0
"""How long Undo / Regenerate / Clear wait for a stopped reply to wind down."""

# (field, label, minimum, maximum or None for "from the model", step); ints are rounded back.
SLIDERS = [
    ("temperature", "Temperature", 0.05, 2.0, 0.05),
    ("top_p", "Top-p", 0.05, 1.0, 0.05),
    ("top_k", "Top-k", 0, 200, 1),
    ("num_beams", "Beams", 1, 8, 1),
    ("max_new_tokens", "Max new tokens", 1, None, 1),
    ("min_new_tokens", "Min new tokens", 0, None, 1),
    ("repetition_penalty", "Repetition penalty", 1.0, 2.0, 0.05),
    ("max_memory", "Max memory (prompt tokens, 0 = model context)", 0, None, 1),
]
INT_FIELDS = {"top_k", "num_beams", "max_new_tokens", "min_new_tokens", "max_memory"}
CONTROL_NAMES = [name for name, *_ in SLIDERS] + ["do_sample", "template", "system", "adapter"]


def messages(history: list[tuple[str, str]], pending: tuple[str, str] | None = None) -> list[dict]:
    """Chat history in Gradio's message format (``{"role", "content"}`` dicts)."""
    out = []
    for user, reply in history + ([pending] if pending else []):
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out


class WebChat:
    """The UI's event handlers, as plain methods (testable without a browser).

    Args:
        prototype: a session carrying the defaults (engine, system prompt, decoding flags); each
            browser tab gets a copy.
        files_dir: where "Save chat" files are written.
    """

    def __init__(self, prototype: ChatSession, files_dir: str | Path):
        self.prototype = prototype
        self.engine = prototype.engine
        self.files_dir = Path(files_dir)

    def new_session(self) -> ChatSession:
        session = ChatSession(self.engine, self.prototype.system, self.prototype.max_memory, self.prototype.gen,
                              adapter=self.prototype.adapter)
        session.template = self.prototype.template
        return session

    def templates(self) -> list[str]:
        auto = ["auto"] if getattr(self.engine.tokenizer, "chat_template", None) else []
        return [*TEMPLATES, *auto]

    def slider_max(self, name: str, hi: float | None) -> float:
        if hi is not None:
            return hi
        current = self.prototype.settings()[name] or 0
        return max(self.engine.context_length, current)

    # -- helpers ----------------------------------------------------------------------------
    def configure(self, session: ChatSession, values: tuple) -> None:
        """Apply the controls' values to the session (ChatError when one is invalid)."""
        settings = dict(zip(CONTROL_NAMES, values))
        for name, *_ in SLIDERS:
            value = settings[name]
            if name in INT_FIELDS and value is not None:
                value = int(round(value))
            session.set(name, None if name == "max_memory" and not value else value)
        session.set("do_sample", bool(settings["do_sample"]))
        if settings["template"] and settings["template"] != session.template.name:
            session.set_template(settings["template"])
        session.set_system(settings["system"])
        if settings["adapter"]:
            session.set_adapter(settings["adapter"])

    def save_file(self, session: ChatSession) -> str:
        """The session written where the "Save chat" button downloads it from."""
        return str(session.save(self.files_dir / f"{id(session):x}" / "chat.json"))

    @staticmethod
    def settle(session: ChatSession) -> None:
        """Stop a running reply and wait until it has been recorded."""
        if session.busy:
            session.stop()
            deadline = time.monotonic() + SETTLE_S
            while session.busy and time.monotonic() < deadline:
                time.sleep(0.02)

    @staticmethod
    def _status(stream, running: bool = False) -> str:
        if running:
            return f"generating… {stream.completion_tokens} tokens"
        reasons = {"cancelled": "stopped", "stop": "finished", "length": "max new tokens reached"}
        reason = reasons.get(stream.finish_reason, "finished")
        note = ""
        if stream.trim.dropped_turns or stream.trim.shortened_turn:
            note = f" · memory: {stream.trim.dropped_turns} oldest turn(s) left out"
            note += ", one shortened" if stream.trim.shortened_turn else ""
        if stream.trim.notice:
            note += f" · {stream.trim.notice}"
        return f"{reason}: {stream.completion_tokens} tokens (prompt {stream.prompt_tokens}){note}"

    def _stream(self, session: ChatSession, stream, user: str) -> Iterator[tuple]:
        import gradio as gr

        failed: list[Exception] = []

        def work() -> None:
            try:
                stream.run()
            except Exception as e:  # shown in the page; the thread must not die silently
                failed.append(e)

        worker = threading.Thread(target=work, name="webui-reply", daemon=True)
        worker.start()
        try:
            first = True
            while worker.is_alive():
                shown = stream.best_text if session.gen.num_beams > 1 else stream.text
                yield (messages(session.history, (user, shown)), session, "" if first else gr.skip(),
                       self._status(stream, running=True), gr.skip())
                first = False
                worker.join(REFRESH_S)
        finally:
            if worker.is_alive():  # the handler was abandoned (tab closed): end the reply too
                session.stop()
        if failed:
            gr.Warning(f"generation failed: {failed[0]}")
        status = f"error: generation failed: {failed[0]}" if failed else self._status(stream)
        yield messages(session.history), session, gr.skip(), status, self.save_file(session)

    def _refused(self, session: ChatSession, error: Exception, message=None) -> Iterator[tuple]:
        import gradio as gr

        gr.Warning(str(error))
        yield (messages(session.history), session, gr.skip() if message is None else message,
               f"error: {error}", gr.skip())

    # -- events -----------------------------------------------------------------------------
    def respond(self, message: str, session: ChatSession | None, *controls) -> Iterator[tuple]:
        """Send a message and stream the reply."""
        session = session or self.new_session()
        if not (message or "").strip():
            yield from self._refused(session, ChatError("type a message first"))
            return
        try:
            self.settle(session)
            self.configure(session, controls)
            stream = session.send(message)
        except ChatError as e:
            yield from self._refused(session, e, message)
            return
        yield from self._stream(session, stream, message)

    def regenerate(self, session: ChatSession | None, *controls) -> Iterator[tuple]:
        """Answer the last message again, with the current settings."""
        session = session or self.new_session()
        try:
            self.settle(session)
            self.configure(session, controls)
            user = session.history[-1][0] if session.history else ""
            stream = session.regenerate()
        except ChatError as e:
            yield from self._refused(session, e)
            return
        yield from self._stream(session, stream, user)

    def stop(self, session: ChatSession | None) -> None:
        if session is not None:
            session.stop()

    def undo(self, session: ChatSession | None) -> tuple:
        session = session or self.new_session()
        self.settle(session)
        turn = session.undo()
        status = "removed the last turn" if turn else "nothing to undo"
        return messages(session.history), session, status, self.save_file(session)

    def clear(self, session: ChatSession | None) -> tuple:
        session = session or self.new_session()
        self.settle(session)
        session.clear()
        return [], session, "history cleared", self.save_file(session)


def build_ui(chat: WebChat):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    proto = chat.prototype
    eng = chat.engine
    with gr.Blocks(title="chinese-vicuna chat", analytics_enabled=False) as demo:
        state = gr.State(lambda: chat.new_session())  # a function: each tab gets its own session
        gr.Markdown(f"### chinese-vicuna · {eng.name}" + (f" + {', '.join(eng.adapters)}" if eng.adapters else ""))
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chat", buttons=["copy"],
                                     feedback_options=None, latex_delimiters=[])
                with gr.Row():
                    box = gr.Textbox(placeholder="输入消息，Enter 发送，Shift+Enter 换行 / Type a message",
                                     show_label=False, lines=1, max_lines=8, scale=5, elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    undo = gr.Button("Undo last turn", elem_id="undo")
                    regen = gr.Button("Regenerate", elem_id="regen")
                    clear = gr.Button("Clear history", elem_id="clear")
                    save = gr.DownloadButton("Save chat", value=chat.save_file(chat.new_session()), elem_id="save")
                status = gr.Markdown("ready", elem_id="status")
            with gr.Column(scale=1):
                adapter = gr.Dropdown([*eng.adapters, "base"], value=proto.adapter, label="Adapter",
                                      visible=bool(eng.adapters), elem_id="set-adapter")
                template = gr.Radio(chat.templates(), value=proto.template.name, label="Prompt template",
                                    elem_id="set-template")
                system = gr.Textbox(proto.system or "", label="System prompt", lines=3, elem_id="set-system",
                                    placeholder=proto.effective_system or "(none)")
                do_sample = gr.Checkbox(proto.gen.do_sample, label="Sampling (off: greedy / beam search)",
                                        elem_id="set-do_sample")
                current = proto.settings()
                sliders = [
                    gr.Slider(lo, chat.slider_max(name, hi), value=current[name] or 0, step=step, label=label,
                              elem_id=f"set-{name}")
                    for name, label, lo, hi, step in SLIDERS
                ]
        controls = [*sliders, do_sample, template, system, adapter]
        streamed = [chatbot, state, box, status, save]
        # Send and Regenerate share one queue: the engine answers one reply at a time anyway.
        run = dict(outputs=streamed, concurrency_id="generate", concurrency_limit=1, show_progress="hidden")
        box.submit(chat.respond, [box, state, *controls], **run)
        send.click(chat.respond, [box, state, *controls], **run)
        regen.click(chat.regenerate, [state, *controls], **run)
        # Stop skips the queue, so it is not stuck behind the reply it is meant to stop.
        stop.click(chat.stop, [state], None, queue=False, show_progress="hidden")
        undo.click(chat.undo, [state], [chatbot, state, status, save], show_progress="hidden")
        clear.click(chat.clear, [state], [chatbot, state, status, save], show_progress="hidden")
        chatbot.clear(chat.clear, [state], [chatbot, state, status, save], show_progress="hidden")  # its trash icon
    return demo


def serve_until_stopped(demo, *, host: str, port: int, auth, banner: str, allowed_paths: tuple[str, ...] = (),
                        on_exit=None) -> None:
    """Launch a Gradio app with our settings and block until Ctrl-C or SIGTERM, then close it.

    Shared by the web UI and the board. SIGTERM (service managers, test harnesses) stops as cleanly
    as Ctrl-C does.
    """
    import gradio as gr

    # System fonts: the default theme fetches Google Fonts, which hangs where they are blocked.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=host, server_port=port, auth=auth, share=False, inbrowser=False, quiet=True,
                show_error=True, ssr_mode=False, prevent_thread_lock=True, allowed_paths=list(allowed_paths),
                footer_links=["gradio", "settings"], theme=theme)
    print(banner, flush=True)
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if on_exit is not None:
            on_exit()
        demo.close()


def launch(session: ChatSession, host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None) -> int:
    """Serve the UI until Ctrl-C; ``session`` supplies the engine and the default settings."""
    files = Path(tempfile.mkdtemp(prefix="chinese-vicuna-webui-"))
    try:
        demo = build_ui(WebChat(session, files))
        demo.queue(max_size=64)
        serve_until_stopped(demo, host=host, port=port, auth=auth, banner=f"web UI at http://{host}:{port} (Ctrl-C stops)",
                            allowed_paths=(str(files),))
    finally:
        shutil.rmtree(files, ignore_errors=True)
    return 0
