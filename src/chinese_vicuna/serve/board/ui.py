"""The board's page: the tabs (``tabs/``, one module each) assembled into one Gradio app, the
once-a-second poll of the run folders that keeps every tab's lists current, and ``launch``."""

from __future__ import annotations

from types import SimpleNamespace

from .app import Board
from .tabs import chat as chat_tab
from .tabs import data as data_tab
from .tabs import evaluate as eval_tab
from .tabs import export as export_tab
from .tabs import model as model_tab
from .tabs import train as train_tab


def build_board(board: Board):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    with gr.Blocks(title="chinese-vicuna board", analytics_enabled=False) as demo:
        gr.Markdown("### chinese-vicuna board · train, watch, evaluate, chat, export")
        with gr.Tabs():
            model = model_tab.build(board)
            data = data_tab.build(board)
            train = train_tab.build(board)
            evaluate = eval_tab.build(board)
            chat = chat_tab.build(board)
            export = export_tab.build(board)
        model_tab.wire(board, model, train)
        data_tab.wire(board, demo, data, model, train)
        train_tab.wire(board, train)
        follow_runs(board, train, evaluate, chat, export)
        eval_tab.wire(board, evaluate, model)
        chat_tab.wire(board, chat)
        export_tab.wire(board, export)
    return demo


def follow_runs(board: Board, train: SimpleNamespace, evaluate: SimpleNamespace, chat: SimpleNamespace,
                export: SimpleNamespace) -> None:
    """Once a second: the selected run's monitor, the runs table, and the run and adapter lists of every tab.

    A list's value is only set when the lists change (a new run or adapter appeared: it becomes the
    selection) or nothing is selected. Setting values every tick would undo a click made while the
    tick was in flight.
    """
    import gradio as gr

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
    timer.tick(tick, [train.run, seen],
               [train.table, train.run, train.status, train.plot, train.log, train.trackers, evaluate.adapters,
                chat.adapter, export.adapter, seen],
               show_progress="hidden", concurrency_id="tick", concurrency_limit=1)


def launch(board: Board, port: int = 7861) -> int:
    """Serve the board until Ctrl-C / SIGTERM; training runs it started keep running."""
    from ...chat.webui import serve_until_stopped

    demo = build_board(board)
    demo.queue(max_size=64)
    serve_until_stopped(demo, host=board.host, port=port, auth=board.auth, on_exit=board.close_chat,
                        banner=f"board at http://{board.host}:{port} (Ctrl-C stops the board; training runs keep going)")
    return 0
