"""Chat tab: the web UI of ``chinese-vicuna webui`` for one adapter, in a frame."""

from __future__ import annotations

from types import SimpleNamespace

from ..app import Board


def build(board: Board) -> SimpleNamespace:
    import gradio as gr

    adapters0 = board.adapters()
    with gr.Tab("Chat", elem_id="tab-chat"):
        with gr.Row():
            adapter = gr.Dropdown([*adapters0, "base"], value=(adapters0 or ["base"])[0], label="Adapter",
                                  elem_id="chat-adapter", scale=3)
            open_btn = gr.Button("Open chat", variant="primary", elem_id="chat-open", scale=1)
            close_btn = gr.Button("Close chat", elem_id="chat-close", scale=1)
        msg = gr.Markdown(elem_id="chat-message")
        frame = gr.HTML(elem_id="chat-area")
    return SimpleNamespace(adapter=adapter, open_btn=open_btn, close_btn=close_btn, msg=msg, frame=frame)


def wire(board: Board, chat: SimpleNamespace) -> None:
    chat.open_btn.click(board.open_chat, chat.adapter, [chat.frame, chat.msg])
    chat.close_btn.click(lambda: ("", board.close_chat()), None, [chat.frame, chat.msg])
