"""Data tab: pick, add or upload data files, and inspect a rendered sample with its statistics."""

from __future__ import annotations

from types import SimpleNamespace

from ..app import DATA_SUFFIXES, Board
from .model import QUICK


def build(board: Board) -> SimpleNamespace:
    import gradio as gr

    samples = [f for f in board.data_files() if f.startswith("data/samples/")]
    default_data = [f for f in samples if f.endswith("instruct.jsonl")][:1]
    with gr.Tab("Data", elem_id="tab-data"):
        files = gr.CheckboxGroup(board.data_files(), value=default_data, label="Data files", elem_id="data-files")
        with gr.Row():
            typed = gr.Textbox(label="Add a file by path", placeholder="data/my.jsonl", scale=4, elem_id="data-path")
            add = gr.Button("Add", scale=1, elem_id="data-add")
            up = gr.File(label="Upload", file_types=list(DATA_SUFFIXES), scale=2, elem_id="data-upload")
        with gr.Row():
            fmt = gr.Dropdown(["auto", "alpaca", "vicuna-chat", "sharegpt", "openai", "text"], value="auto",
                              label="Format", elem_id="data-format")
            inspect_btn = gr.Button("Inspect", variant="primary", elem_id="data-inspect")
        msg = gr.Markdown(elem_id="data-error")
        preview = gr.HTML(elem_id="data-preview")
        stats = gr.Markdown(elem_id="data-stats")
    return SimpleNamespace(files=files, typed=typed, add=add, up=up, fmt=fmt, inspect_btn=inspect_btn, msg=msg,
                           preview=preview, stats=stats)


def wire(board: Board, demo, data: SimpleNamespace, model: SimpleNamespace, train: SimpleNamespace) -> None:
    """Files into the Train tab's ``data_path``; Inspect with the Model tab's choices and ``cutoff_len``."""

    def joined(fs):
        return ", ".join(fs or [])

    data.files.change(joined, data.files, train.fields["data_path"], **QUICK)
    demo.load(joined, data.files, train.fields["data_path"], **QUICK)
    data.add.click(board.add_path, [data.typed, data.files], [data.files, data.msg])
    data.typed.submit(board.add_path, [data.typed, data.files], [data.files, data.msg])
    data.up.upload(board.upload, [data.up, data.files], [data.files, data.msg])
    data.inspect_btn.click(board.inspect, [data.files, data.fmt, model.template, model.base,
                                           train.fields["cutoff_len"]], [data.preview, data.stats, data.msg])
