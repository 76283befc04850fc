"""Export tab: merge an adapter into its base, or write a GGUF file for llama.cpp."""

from __future__ import annotations

from types import SimpleNamespace

from ..app import Board
from .evaluate import HEAVY


def build(board: Board) -> SimpleNamespace:
    import gradio as gr

    adapters0 = board.adapters()
    with gr.Tab("Export", elem_id="tab-export"):
        adapter = gr.Dropdown(adapters0, value=adapters0[0] if adapters0 else None, label="Adapter",
                              allow_custom_value=True, elem_id="export-adapter")
        with gr.Row():
            merge_out = gr.Textbox(label="Merged model folder (default: ADAPTER-merged)", elem_id="export-merge-out")
            merge_btn = gr.Button("Merge", elem_id="export-merge")
        with gr.Row():
            gguf_type = gr.Dropdown(["f16", "bf16", "f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m"], value="q8_0",
                                    label="GGUF type", elem_id="export-type")
            gguf_out = gr.Textbox(label="GGUF file (default: ADAPTER.TYPE.gguf)", elem_id="export-gguf-out")
            gguf_btn = gr.Button("Export GGUF", variant="primary", elem_id="export-gguf")
        msg = gr.Markdown(elem_id="export-result")
    return SimpleNamespace(adapter=adapter, merge_out=merge_out, merge_btn=merge_btn, gguf_type=gguf_type,
                           gguf_out=gguf_out, gguf_btn=gguf_btn, msg=msg)


def wire(board: Board, ex: SimpleNamespace) -> None:
    ex.merge_btn.click(board.merge, [ex.adapter, ex.merge_out], ex.msg, **HEAVY)
    ex.gguf_btn.click(board.gguf, [ex.adapter, ex.gguf_type, ex.gguf_out], ex.msg, **HEAVY)
