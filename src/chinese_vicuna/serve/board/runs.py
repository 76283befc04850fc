"""Training runs as the board sees them: output folders, whoever started them.

A run is an output folder. The trainer keeps ``status.json`` (state, pid, step, total steps) and
``metrics.csv`` there (see ``train/callbacks.py``), so a run started with ``chinese-vicuna train`` in a
terminal shows up exactly like one started from the board. The board starts training as a separate
``chinese-vicuna train`` process in its own session (closing the page, or the board, does not end
it), with its output in ``train.log``; Stop sends SIGTERM, on which the trainer finishes the step and
writes a resumable checkpoint; Resume runs the folder's ``run_config.yaml`` with ``--resume auto``.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...train.checkpoint import list_checkpoints

LOG_FILE = "train.log"
BOARD_FILE = "board.json"
"""Written by the board when it starts a run: the command line and the start time."""


@dataclass
class Run:
    path: Path
    state: str
    """starting, running, finished, stopped, failed (exit code / process gone), or unknown."""
    step: int = 0
    total: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    checkpoints: int = 0
    has_adapter: bool = False
    source: str = "cli"
    trackers: dict | None = None
    pid: int | None = None


def pid_alive(pid: int | None) -> bool:
    """A live (not zombie) process with this id."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_metrics(folder: Path) -> list[dict]:
    """``metrics.csv`` rows as numbers (empty cells left out)."""
    try:
        with open(folder / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for r in rows:
        try:
            out.append({k: float(v) for k, v in r.items() if v not in ("", None)})
        except ValueError:  # a row being written
            continue
    return out


def log_tail(folder: Path, lines: int = 30, max_bytes: int = 64_000) -> str:
    """The end of ``train.log`` as a terminal shows it (progress-bar redraws collapsed)."""
    path = folder / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = []
    for line in text.split("\n"):
        redraws = [part for part in line.split("\r") if part.strip()]
        shown.append(redraws[-1] if redraws else "")
    return "\n".join(shown[-lines:]).strip("\n")


class RunManager:
    """Starts, stops and resumes ``chinese-vicuna train`` processes; lists runs under the output roots."""

    def __init__(self, workdir: Path, roots: list[Path]):
        self.workdir = Path(workdir)
        self.roots = roots
        self.procs: dict[Path, subprocess.Popen] = {}

    # -- discovery --------------------------------------------------------------------------
    def folders(self) -> list[Path]:
        """Run folders (with status.json, metrics.csv or a board start) under the roots, two levels deep."""
        found: set[Path] = set(self.procs)
        for root in self.roots:
            if not root.is_dir():
                continue
            for d in [root, *root.iterdir(), *(c for p in root.iterdir() if p.is_dir() for c in p.iterdir())]:
                if d.is_dir() and any((d / f).exists() for f in ("status.json", "metrics.csv", BOARD_FILE)):
                    found.add(d.resolve())
        return sorted(found, key=lambda p: self._mtime(p), reverse=True)

    @staticmethod
    def _mtime(d: Path) -> float:
        return max((d / f).stat().st_mtime for f in ("status.json", "metrics.csv", BOARD_FILE, LOG_FILE, ".")
                   if (d / f).exists())

    def runs(self) -> list[Run]:
        return [self.run(d) for d in self.folders()]

    def run(self, folder: Path) -> Run:
        folder = Path(folder).resolve()
        status = read_json(folder / "status.json")
        board = read_json(folder / BOARD_FILE)
        proc = self.procs.get(folder)
        code = proc.poll() if proc is not None else None
        live = proc is not None and code is None
        stale = bool(board) and status.get("updated_at", 0) < board.get("started_at", 0)
        if live:
            state = "starting" if stale or not status else status.get("state", "running")
        elif proc is not None:  # ours, ended
            state = status.get("state", "finished") if code == 0 and not stale else f"failed (exit {code})"
        else:
            state = status.get("state", "unknown")
            if state == "running" and not pid_alive(status.get("pid")):
                state = "failed (process gone)"
        metrics = read_metrics(folder)
        last = next((r for r in reversed(metrics) if "loss" in r), {})
        val = next((r for r in reversed(metrics) if "val_loss" in r), {})
        tps = next((r for r in reversed(metrics) if "tokens_per_s" in r), {})
        step = int(status.get("step", last.get("step", 0)) or 0)
        total = status.get("total_steps")
        eta = None
        if state == "running" and total and status.get("started_at") and status.get("updated_at"):
            done = step - status.get("start_step", 0)
            spent = status["updated_at"] - status["started_at"]
            if done > 0 and spent > 0:
                eta = (total - step) * spent / done
        return Run(folder, state, step, total, last.get("loss"), val.get("val_loss"), tps.get("tokens_per_s"),
                   eta, len(list_checkpoints(folder)), (folder / "adapter_config.json").exists(),
                   "board" if board else "cli", status.get("trackers") or {}, status.get("pid"))

    # -- control ----------------------------------------------------------------------------
    def start(self, argv: list[str], output_dir: Path) -> subprocess.Popen:
        """Run ``chinese-vicuna train ARGV`` in its own session, output in ``output_dir/train.log``."""
        output_dir = Path(output_dir).resolve()
        current = self.procs.get(output_dir)
        state = self.run(output_dir).state
        if current is not None and current.poll() is None and state in ("stopped", "finished"):
            try:  # its loop is over (status written); it is writing loss.png and exiting
                current.wait(60)
            except subprocess.TimeoutExpired:
                pass
        if (current is not None and current.poll() is None) or state in ("running", "starting"):
            raise RuntimeError(f"{output_dir}: a run is already training in this folder")
        output_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "chinese_vicuna", "train", *argv]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        tmp = output_dir / f".{BOARD_FILE}.tmp"
        tmp.write_text(json.dumps({"command": ["chinese-vicuna", "train", *argv], "started_at": time.time()},
                                  ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, output_dir / BOARD_FILE)
        with open(output_dir / LOG_FILE, "ab") as log:
            log.write(f"$ chinese-vicuna train {' '.join(map(shlex.quote, argv))}\n".encode())
            log.flush()
            # its own session: Ctrl-C on the board, or the board ending, does not reach the training
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                                    start_new_session=True)
        self.procs[output_dir] = proc
        return proc

    def stop(self, folder: Path) -> str:
        """SIGTERM to the run's trainer (it saves a checkpoint after the current step and exits)."""
        folder = Path(folder).resolve()
        run = self.run(folder)
        proc = self.procs.get(folder)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            return f"asked {folder.name} to stop: it saves a checkpoint after the current step"
        if run.state == "running" and run.pid and pid_alive(run.pid):
            os.kill(run.pid, signal.SIGTERM)
            return f"asked {folder.name} (pid {run.pid}) to stop: it saves a checkpoint after the current step"
        raise RuntimeError(f"{folder.name}: not running ({run.state})")

    def resume(self, folder: Path) -> subprocess.Popen:
        """Continue from the newest checkpoint, with the run's own resolved config."""
        folder = Path(folder).resolve()
        if not list_checkpoints(folder):
            raise RuntimeError(f"{folder.name}: no checkpoint to resume from")
        config = folder / "run_config.yaml"
        if not config.exists():
            raise RuntimeError(f"{folder.name}: no run_config.yaml")
        return self.start([str(config), "--resume", "auto", "--output_dir", str(folder)], folder)

    def close(self) -> None:
        """Forget the processes (they keep running in their own sessions)."""
        self.procs.clear()
