"""``chinese-vicuna train ... --launcher ray --num_workers N``: the same trainer on a Ray cluster.

Ray Train's ``TorchTrainer`` starts N workers, sets up ``torch.distributed`` among them (gloo on
CPUs, NCCL on GPUs) and the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables; each worker then runs
``run_training`` exactly as ``torchrun`` would run it, so accelerate sees an ordinary data-parallel
job and the adapter equals a DDP run's. The cluster is the one ``RAY_ADDRESS`` points to (``ray
start --head`` / a Ray cluster a user already has), or a local one started for this run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import ConfigError, TrainConfig


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Workers may run in another directory: local paths become absolute (hub ids stay as they are)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), data=dataclasses.replace(cfg.data),
                              train=dataclasses.replace(cfg.train), lora=dataclasses.replace(cfg.lora))

    def local(p: str | None) -> str | None:
        if p is None:
            return p
        weight = ""
        if "*" in p:  # PATH*W weighting of data_path
            p, _, w = p.rpartition("*")
            weight = "*" + w
        return (str(Path(p).resolve()) if Path(p).exists() else p) + weight

    cfg.model.base_model = local(cfg.model.base_model)
    cfg.lora.init_adapter = local(cfg.lora.init_adapter)
    cfg.data.data_path = [local(p) for p in cfg.data.data_path]
    cfg.train.output_dir = str(Path(cfg.train.output_dir).resolve())
    if cfg.train.resume not in (None, "auto", "latest"):
        cfg.train.resume = local(cfg.train.resume)
    cfg.train.launcher = "local"  # inside a worker the trainer runs as under torchrun
    return cfg


def _worker(config: dict) -> None:
    import os

    from ..config import load_config
    from .trainer import run_training

    path = Path(config["output_dir"]) / f".ray_config.{os.getpid()}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config["yaml"], encoding="utf-8")
    try:
        cfg = load_config(path)
    finally:
        path.unlink(missing_ok=True)
    run_training(cfg, progress_bar=int(os.environ.get("RANK", "0")) == 0)


def run_ray(cfg: TrainConfig) -> Path:
    """Train ``cfg`` on ``cfg.train.num_workers`` Ray workers; returns the output folder.

    Raises:
        ConfigError: Ray Train is not installed, or num_workers < 1.
    """
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise ConfigError("launcher: ray needs Ray Train: pip install 'chinese-vicuna[ray]'") from None
    n = cfg.train.num_workers
    if n < 1:
        raise ConfigError(f"num_workers: expected >= 1, got {n}")
    cfg = _absolute(cfg)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)  # RAY_ADDRESS selects an existing cluster, else a local one starts
    gpus = ray.cluster_resources().get("GPU", 0) >= n
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"yaml": cfg.to_yaml(), "output_dir": str(out)},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=gpus),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(name="chinese-vicuna", storage_path=str(out / "ray")),
    )
    trainer.fit()
    return out
