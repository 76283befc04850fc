"""report_to swanlab / mlflow (their offline / local modes), status.json, and graceful stop + resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_flags, write_jsonl
from safetensors.torch import load_file

from chinese_vicuna.config import load_config
from chinese_vicuna.train.checkpoint import list_checkpoints
from chinese_vicuna.train.trainer import run_training


def overrides(base, data, out, **kw) -> list[str]:
    return run_flags(base, data, out, **{"lora_dropout": 0.0, "group_by_length": "true", **kw})


def csv_rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def data_file(tmp_path) -> Path:
    rows = [{"instruction": f"问题{i}：一加{i}等于几？", "input": "", "output": f"等于{i + 1}。"} for i in range(24)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def swanlab_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    """The scalars of the one offline SwanLab run under ``logdir``, read back with SwanLab's own reader."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    files = list(logdir.glob("run-*/*.swanlab"))
    assert len(files) == 1, files
    reader = DataStoreReader()
    reader.open(files[0])
    out = {}
    for raw in reader:
        rec = Record()
        rec.ParseFromString(raw)
        if rec.HasField("scalar"):
            out[(rec.scalar.key, rec.scalar.step)] = rec.scalar.value.number
    return out


def test_swanlab_offline_and_mlflow_file_store_get_the_csv_metrics(tiny_model_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("swanlab")
    pytest.importorskip("mlflow")
    for var in ("SWANLAB_MODE", "SWANLAB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the logger sets it too; keep it out of os.environ after
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_model_dir, data_file, out, max_steps=3, report_to="swanlab,mlflow",
                                      val_size=4, eval_steps=2))
    run_training(cfg, progress_bar=False)
    rows = csv_rows(out)
    loss = {int(r["step"]): float(r["loss"]) for r in rows}
    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert sorted(loss) == [1, 2, 3] and sorted(val) == [2, 3]

    scalars = swanlab_scalars(out / "swanlog")
    assert {s: v for (k, s), v in scalars.items() if k == "loss"} == pytest.approx(loss, rel=1e-6)
    assert {s: v for (k, s), v in scalars.items() if k == "val_loss"} == pytest.approx(val, rel=1e-6)

    from mlflow.tracking import MlflowClient

    uri = (out / "mlruns").resolve().as_uri()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("chinese-vicuna")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lora_r"] == "4" and run.data.params["max_steps"] == "3"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(loss, rel=1e-6)

    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"], status["total_steps"], status["pid"]) == ("finished", 3, 3, os.getpid())
    assert set(status["trackers"]) == {"swanlab", "mlflow"}
    assert status["trackers"]["mlflow"].startswith(f"mlflow ui --backend-store-uri {uri} (run {run.info.run_id})")
    assert status["trackers"]["swanlab"] == f"swanlab sync {out / 'swanlog'} (offline log)"


STOPPER = textwrap.dedent(
    """
    import os, signal, sys
    from chinese_vicuna.config import load_config
    from chinese_vicuna.train.trainer import run_training

    def stop_at_step_2(trainer, step, metrics):
        if step == 2:
            os.kill(os.getpid(), getattr(signal, os.environ["STOP_SIGNAL"]))

    trainer = run_training(load_config(None, sys.argv[1:]), callbacks=[stop_at_step_2], progress_bar=False)
    print("stopped_at", trainer.stopped_at)
    """
)


# SIGINT takes the same path as SIGTERM (one handler); its subprocess run is in the slow set
@pytest.mark.parametrize("how", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow), "file"])
def test_stop_leaves_a_resumable_checkpoint_and_resume_matches_uninterrupted(how, tiny_model_dir, data_file, tmp_path):
    common = dict(max_steps=5, save_steps=4)
    ref = tmp_path / "ref"
    run_training(load_config(None, overrides(tiny_model_dir, data_file, ref, **common)), progress_bar=False)

    out = tmp_path / "stopped"
    if how == "file":  # a STOP file, checked between steps like a signal
        def touch(trainer, step, metrics):
            if step == 2:
                (out / "STOP").touch()

        trainer = run_training(load_config(None, overrides(tiny_model_dir, data_file, out, **common)),
                               callbacks=[touch], progress_bar=False)
        assert trainer.stopped_at == 2 and not (out / "STOP").exists()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the loop
    else:
        proc = subprocess.run([sys.executable, "-c", STOPPER, *overrides(tiny_model_dir, data_file, out, **common)],
                              capture_output=True, text=True, env=dict(os.environ, STOP_SIGNAL=how))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "stopped_at 2" in proc.stdout
        assert f"{how}: stopping after this step and saving a checkpoint" in proc.stdout
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()  # not finished: no final adapter
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"], status["total_steps"]) == ("stopped", 2, 5)

    trainer = run_training(load_config(None, overrides(tiny_model_dir, data_file, out, resume="auto", **common)),
                           progress_bar=False)
    assert trainer.stopped_at is None and trainer.resumed_from.name == "checkpoint-2"
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    ref_loss = {r["step"]: float(r["loss"]) for r in csv_rows(ref)}
    assert {r["step"]: float(r["loss"]) for r in csv_rows(out)} == pytest.approx(ref_loss, abs=1e-5)
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
