"""Evaluate tab: answers side by side, perplexity and C-Eval / CMMLU accuracy of the chosen adapters."""

from __future__ import annotations

from types import SimpleNamespace

from ..app import Board

HEAVY = dict(concurrency_id="model", concurrency_limit=1)
"""Events that load a model: one at a time on this machine."""


def build(board: Board) -> SimpleNamespace:
    import gradio as gr

    with gr.Tab("Evaluate", elem_id="tab-eval"):
        adapters = gr.CheckboxGroup(board.adapters(), label="Adapters (compared with the base)",
                                    elem_id="eval-adapters")
        with gr.Row():
            prompts = gr.Textbox("data/samples/heldout.jsonl", label="Prompts (JSONL of instruction/input)",
                                 elem_id="eval-prompts", scale=3)
            limit = gr.Number(3, precision=0, label="Prompts", elem_id="eval-limit")
            max_new = gr.Number(48, precision=0, label="Max new tokens", elem_id="eval-max-new")
        compare_btn = gr.Button("Compare answers", variant="primary", elem_id="eval-compare")
        msg = gr.Markdown(elem_id="eval-message")
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
    return SimpleNamespace(adapters=adapters, prompts=prompts, limit=limit, max_new=max_new,
                           compare_btn=compare_btn, msg=msg, answers=answers, ppl_data=ppl_data, ppl_btn=ppl_btn,
                           ppl=ppl, bench=bench, bench_data=bench_data, bench_limit=bench_limit,
                           bench_btn=bench_btn, bench_out=bench_out)


def wire(board: Board, ev: SimpleNamespace, model: SimpleNamespace) -> None:
    """Each button on the chosen adapters and the Model tab's base."""
    ev.compare_btn.click(board.compare, [ev.adapters, ev.prompts, ev.limit, ev.max_new, model.base],
                         [ev.answers, ev.msg], **HEAVY)
    ev.ppl_btn.click(board.perplexity, [ev.adapters, ev.ppl_data, model.base], ev.ppl, **HEAVY)
    ev.bench_btn.click(board.benchmark, [ev.adapters, ev.bench, ev.bench_data, ev.bench_limit, model.base],
                       ev.bench_out, **HEAVY)
