"""Train tab: the config form (every config key, grouped), the command line it stands for,
Start / Stop / Resume, and the monitor of the selected run (status, loss plot, log, runs table)."""

from __future__ import annotations

from types import SimpleNamespace

from ..app import Board
from ..form import FieldSpec
from .model import QUICK

OPEN_GROUPS = ("lora", "train")
"""Config groups shown unfolded (model and data keys are set from their own tabs)."""


def _field(spec: FieldSpec):
    import gradio as gr

    common = dict(label=spec.key, info=spec.doc or None, elem_id=f"cfg-{spec.key}")
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=spec.default_text, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default_text, **common)
    if spec.kind in ("int", "float") and not spec.optional:
        return gr.Number(value=spec.default_text, precision=0 if spec.kind == "int" else None, **common)
    return gr.Textbox(value=spec.default_text, lines=1, **common)


def build(board: Board) -> SimpleNamespace:
    import gradio as gr

    specs = board.specs
    presets = sorted(board.rel(p) for p in (board.workdir / "configs").glob("*.yaml"))
    fields: dict[str, object] = {}
    with gr.Tab("Train", elem_id="tab-train"):
        with gr.Row():
            preset = gr.Dropdown(presets, value=None, label="Preset", elem_id="train-preset", scale=3)
            load = gr.Button("Load preset", scale=1, elem_id="train-load")
        groups: dict[str, list[FieldSpec]] = {}
        for s in specs:
            groups.setdefault(s.group, []).append(s)
        for group, members in groups.items():
            with gr.Accordion(f"{group} ({len(members)} keys)", open=group in OPEN_GROUPS):
                for i in range(0, len(members), 3):
                    with gr.Row():
                        for s in members[i : i + 3]:
                            fields[s.key] = _field(s)
        form = [fields[k] for k in board.keys]
        cmd = gr.Code(board.command(*[s.default_text for s in specs]), language="shell",
                      label="Command line (the same run from a terminal)", elem_id="train-command")
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="train-start")
            stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
            resume = gr.Button("Resume", elem_id="train-resume")
        msg = gr.Markdown(elem_id="train-message")
        with gr.Column(elem_id="run-monitor"):
            runs0 = [board.rel(d) for d in board.runs.folders()]
            run = gr.Dropdown(runs0, value=runs0[0] if runs0 else None, label="Run", allow_custom_value=True,
                              elem_id="run-select")
            status = gr.Markdown(elem_id="run-status")
            plot = gr.LinePlot(None, x="step", y="loss", color="series", title="loss", height=280,
                               elem_id="loss-plot")
            trackers = gr.Markdown(elem_id="run-trackers")
            log = gr.Code(label="Log (tail)", elem_id="run-log", lines=12, max_lines=12)
            table = gr.Dataframe(headers=["run", "state", "step", "loss", "val loss", "tokens/s", "ETA",
                                          "checkpoints", "started from"], value=board.runs_table(),
                                 interactive=False, label="Runs", elem_id="runs")
    return SimpleNamespace(fields=fields, form=form, preset=preset, load=load, cmd=cmd, start=start, stop=stop,
                           resume=resume, msg=msg, run=run, status=status, plot=plot, trackers=trackers, log=log,
                           table=table)


def wire(board: Board, train: SimpleNamespace) -> None:
    """The form redraws the command line; the buttons start, stop and resume runs; a run selected shows."""
    for c in train.form:
        c.change(board.command, train.form, train.cmd, **QUICK)
    train.load.click(board.load_preset, train.preset, train.form)
    train.start.click(board.start, train.form, [train.msg, train.run])
    train.stop.click(board.stop, train.run, train.msg, queue=False)
    train.resume.click(board.resume, train.run, train.msg)
    train.run.change(board.run_status, train.run, [train.status, train.plot, train.log, train.trackers], **QUICK)
