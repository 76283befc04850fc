"""Model tab: the base model, quantization and prompt template, and the size / memory plan."""

from __future__ import annotations

from types import SimpleNamespace

from ..app import EMBEDDED, Board

TEMPLATES = ("alpaca", "vicuna-chat", "auto")

QUICK = dict(show_progress="hidden")
"""For events that only copy a value: no progress overlay."""


def build(board: Board) -> SimpleNamespace:
    import gradio as gr

    with gr.Tab("Model", elem_id="tab-model"):
        base = gr.Dropdown(board.model_choices(), value=EMBEDDED, allow_custom_value=True,
                           label="Base model (a local folder, .gguf file or hub id may be typed)",
                           elem_id="model-base")
        with gr.Row():
            quant = gr.Radio(["none", "4bit", "8bit"], value="none", label="Quantization (4bit = QLoRA)",
                             elem_id="model-quantization")
            template = gr.Radio(list(TEMPLATES), value="alpaca", label="Prompt template", elem_id="model-template")
        info_btn = gr.Button("Show size", elem_id="model-info-btn")
        info = gr.Markdown(elem_id="model-info")
    return SimpleNamespace(base=base, quant=quant, template=template, info_btn=info_btn, info=info)


def wire(board: Board, model: SimpleNamespace, train: SimpleNamespace) -> None:
    """The size button, and the choices made here copied into the Train tab's config form."""
    model.info_btn.click(board.model_info, [model.base, model.quant], model.info)
    model.base.change(lambda b: "" if b == EMBEDDED else b, model.base, train.fields["base_model"], **QUICK)
    model.quant.change(lambda q: q, model.quant, train.fields["quantization"], **QUICK)
    model.template.change(lambda t: t, model.template, train.fields["template"], **QUICK)
