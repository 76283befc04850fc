"""Training telemetry: progress bar, tokens/s, peak memory, CSV, TensorBoard/wandb, loss plot."""

from __future__ import annotations

import csv
import os
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def peak_memory_mb() -> float:
    """Peak GPU memory if on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainLogger:
    """Everything the loop reports goes through here (main process only)."""

    FIELDS = ["step", "epoch", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "peak_mem_mb"]

    def __init__(
        self,
        output_dir: str,
        total_steps: int,
        start_step: int,
        report_to: list[str],
        enabled: bool,
        config: dict | None = None,
        show_bar: bool = True,
    ):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.total = total_steps
        self.bar = None
        self.tb = None
        self.wandb = None
        self.t0 = time.perf_counter()
        self.window_tokens = self.window_trained = 0
        self.window_t = self.t0
        self.history: list[dict] = []
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        if start_step == 0 or not self.csv_path.exists():
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)
        else:  # resumed: keep the rows up to the checkpoint, forget the lost ones after it
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
            self.history = [{k: v for k, v in r.items() if v != ""} for r in rows]
            tmp = self.csv_path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.FIELDS)
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, self.csv_path)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "runs"))
            except ImportError:
                print("tensorboard is not installed; logging to CSV only")
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "chinese-vicuna"), config=config)
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True, disable=not show_bar
        )

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
        for k, v in row.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                if self.tb:
                    self.tb.add_scalar(f"train/{k}" if k != "val_loss" else "eval/loss", v, step)
        if self.wandb:
            self.wandb.log(row, step=step)
        if self.bar is not None:
            shown = {k: row[k] for k in ("loss", "val_loss", "lr", "tokens_per_s") if k in row}
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()})
            if "val_loss" in row:
                self.bar.write(f"step {step}: val_loss {row['val_loss']:.4f}")
        return row

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.enabled:
            plot_loss(self.history, self.dir / "loss.png")


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
