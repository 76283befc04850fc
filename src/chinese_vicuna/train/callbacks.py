"""Training telemetry: progress bar, tokens/s, peak memory, CSV, trackers, loss plot, run status, stop requests.

Besides ``metrics.csv`` the logger keeps ``status.json`` in the output folder (state, pid, step, total
steps, start time, tracker links), rewritten atomically as the run goes; the board (and anyone with
``cat``) reads a run's progress from these two files, whether it was started from the board or the CLI.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def peak_memory_mb() -> float:
    """Peak GPU memory if on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TensorBoardSink:
    """TensorBoard event files in ``output_dir/runs``."""

    def __init__(self, out: Path, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "runs"))
        self.where = f"tensorboard --logdir {out / 'runs'}"

    def log(self, row: dict, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            if k != "epoch":
                self.writer.add_scalar(f"train/{k}" if k != "val_loss" else "eval/loss", v, step)

    def close(self, state: str) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (project ``WANDB_PROJECT``, default chinese-vicuna)."""

    def __init__(self, out: Path, config: dict | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "chinese-vicuna"), config=config)
        self.where = getattr(self.run, "url", None) or "wandb"

    def log(self, row: dict, scalars: dict[str, float], step: int) -> None:
        self.run.log(row, step=step)

    def close(self, state: str) -> None:
        self.run.finish()


class SwanLabSink:
    """A SwanLab run; offline (a log folder ``swanlog`` that ``swanlab sync`` uploads later) unless
    ``SWANLAB_MODE`` says otherwise or ``SWANLAB_API_KEY`` is set (then cloud)."""

    def __init__(self, out: Path, config: dict | None):
        try:
            import swanlab
        except ImportError:
            raise ImportError("report_to swanlab needs SwanLab: pip install 'chinese-vicuna[swanlab]'") from None
        mode = os.environ.get("SWANLAB_MODE") or ("cloud" if os.environ.get("SWANLAB_API_KEY") else "offline")
        logdir = out / "swanlog"
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "chinese-vicuna"),
                                experiment_name=out.name, config=config or {}, mode=mode, logdir=str(logdir))
        self.where = f"swanlab sync {logdir} (offline log)"
        if mode == "cloud":
            url = getattr(getattr(getattr(self.run, "public", None), "cloud", None), "experiment_url", None)
            self.where = str(url) if url else "swanlab (cloud)"

    def log(self, row: dict, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, state: str) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run: ``MLFLOW_TRACKING_URI`` if set, else a file store ``mlruns`` in the output folder."""

    def __init__(self, out: Path, config: dict | None):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("report_to mlflow needs MLflow: pip install 'chinese-vicuna[mlflow]'") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in "maintenance mode" behind this switch; it needs no
            # database server, which is what a local run wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "chinese-vicuna")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in (config or {}).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.where = f"mlflow ui --backend-store-uri {uri} (run {self.run_id})"

    def log(self, row: dict, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in scalars.items()])

    def close(self, state: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if state == "finished" else "KILLED")


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "swanlab": SwanLabSink, "mlflow": MlflowSink}
"""The trackers ``report_to`` names, one sink each: ``log(row, scalars, step)``, ``close(state)``, ``where``."""


class TrainLogger:
    """Everything the loop reports goes through here (main process only)."""

    FIELDS = ["step", "epoch", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "peak_mem_mb"]
    STATUS_EVERY_S = 0.5
    """status.json is rewritten at most this often while steps advance (and always at log/close)."""

    def __init__(
        self,
        output_dir: str,
        total_steps: int,
        start_step: int,
        report_to: list[str],
        enabled: bool,
        config: dict | None = None,
        show_bar: bool = True,
        extra_fields: tuple[str, ...] = (),
    ):
        self.FIELDS = self.FIELDS + list(extra_fields)  # e.g. preference tuning's rewards/* columns
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.total = total_steps
        self.bar = None
        self.sinks: list = []
        self.t0 = time.perf_counter()
        self.step = start_step
        self.status: dict = {}
        self._status_t = 0.0
        self.window_tokens = self.window_trained = 0
        self.window_t = self.t0
        self.history: list[dict] = []
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        self._open_csv(start_step)
        trackers = self._start_sinks(report_to, config)
        self.status = {"state": "running", "pid": os.getpid(), "step": start_step, "start_step": start_step,
                       "total_steps": total_steps, "started_at": time.time(), "trackers": trackers}
        self.write_status()
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True, disable=not show_bar
        )

    def _open_csv(self, start_step: int) -> None:
        """metrics.csv: a new header, or (resumed) the rows up to the checkpoint without the lost ones after it."""
        if start_step == 0 or not self.csv_path.exists():
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)
            return
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.history = [{k: v for k, v in r.items() if v != ""} for r in rows]
        tmp = self.csv_path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv_path)

    def _start_sinks(self, report_to: list[str], config: dict | None) -> dict[str, str]:
        """One sink per tracker in ``report_to``; returns {tracker: how to view it} for status.json."""
        unknown = [r for r in report_to if r not in (*SINKS, "none")]
        if unknown:
            print(f"report_to: unknown tracker(s) {', '.join(unknown)} (known: {', '.join(SINKS)}, none)")
        trackers: dict[str, str] = {}
        for name, sink in SINKS.items():
            if name not in report_to:
                continue
            try:
                self.sinks.append(sink(self.dir, config))
            except ImportError:
                if name != "tensorboard":
                    raise
                print("tensorboard is not installed; logging to CSV only")
                continue
            trackers[name] = self.sinks[-1].where
        return trackers

    def write_status(self, **changes) -> None:
        """Update ``status.json`` atomically (main process only)."""
        if not self.enabled:
            return
        self.status.update(changes, updated_at=time.time())
        tmp = self.dir / f".status.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.status, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.dir / "status.json")
        self._status_t = time.monotonic()

    def tokens(self, real: int, trained: int) -> None:
        self.window_tokens += real
        self.window_trained += trained

    def log(self, step: int, epoch: float, **metrics) -> dict:
        """Record metrics for ``step``; throughput is measured since the previous log call."""
        now = time.perf_counter()
        dt = max(now - self.window_t, 1e-9)
        row = {"step": step, "epoch": round(epoch, 4), **metrics}
        if self.window_tokens:
            row["tokens_per_s"] = round(self.window_tokens / dt, 1)
            row["trained_tokens_per_s"] = round(self.window_trained / dt, 1)
        row["peak_mem_mb"] = round(peak_memory_mb(), 1)
        self.window_tokens = self.window_trained = 0
        self.window_t = now
        self.history.append(row)
        if not self.enabled:
            return row
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS, extrasaction="ignore").writerow(row)
        scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.log(row, scalars, step)
        self.write_status(step=step)
        if self.bar is not None:
            shown = {k: row[k] for k in ("loss", "val_loss", "rewards/margins", "rewards/accuracies", "lr", "tokens_per_s") if k in row}
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()})
            if "val_loss" in row:
                self.bar.write(f"step {step}: val_loss {row['val_loss']:.4f}")
        return row

    def advance(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
        if self.enabled and time.monotonic() - self._status_t >= self.STATUS_EVERY_S:
            self.write_status(step=self.step)

    def close(self, state: str = "finished") -> None:
        """End the trackers; ``state`` (``finished`` or ``stopped``) goes into status.json."""
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close(state)
        if self.enabled:
            plot_loss(self.history, self.dir / "loss.png")
            self.write_status(state=state, step=self.step)


STOP_FILE = "STOP"
"""A file of this name in output_dir asks a running trainer to stop (like SIGTERM), for platforms or
launchers that cannot send signals."""


class StopRequest:
    """SIGTERM, SIGINT (Ctrl-C) or a ``STOP`` file ask the training loop to stop after the current step.

    The loop then writes a resumable checkpoint and returns; a second signal interrupts at once (the
    previous handler runs). Under several processes the request is shared (``max`` over processes), so
    every rank stops at the same step. Handlers are installed only from the main thread (Python's rule).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, output_dir: str | os.PathLike, accelerator=None):
        self.file = Path(output_dir) / STOP_FILE
        self.accelerator = accelerator
        self.signalled = False
        self._previous: dict[int, object] = {}
        self.file.unlink(missing_ok=True)  # a leftover request from an earlier stop
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signalled:  # asked twice: do what would have happened without us
            previous = self._previous.get(signum)
            self.close()
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                raise SystemExit(128 + signum)
            return
        self.signalled = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to stop at once)", flush=True)

    def requested(self) -> bool:
        """True when any process was asked to stop (collective: call it on every process)."""
        local = self.signalled or self.file.exists()
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return local
        import torch

        return bool(acc.reduce(torch.tensor(float(local), device=acc.device), "max") > 0)

    def close(self) -> bool:
        """Restore the previous handlers; returns whether a stop was requested."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        stopped = self.signalled or self.file.exists()
        self.file.unlink(missing_ok=True)
        return stopped


def plot_loss(history: list[dict], path: Path) -> None:
    """Training and validation loss against step, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(int(r["step"]), float(r["loss"])) for r in history if "loss" in r]
    val = [(int(r["step"]), float(r["val_loss"])) for r in history if "val_loss" in r]
    if not train and not val:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
