"""The distributed engines, each run for real on this CPU where it can run (tiny model, seconds per run).

Every multi-process run is compared with a 1-process run of the same global batch: the same losses
and the same adapter (the DDP test in test_sft.py is the model for these).
"""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import free_port, write_jsonl
from safetensors.torch import load_file

from chinese_vicuna.config import load_config
from chinese_vicuna.train.trainer import Trainer, run_training

ROOT = Path(__file__).resolve().parents[2]
COMMON = dict(max_steps=2, lora_dropout=0.0, micro_batch_size=1, batch_size=4, cutoff_len=128)


def flags(base, data, out, **kw):
    args = dict(
        base_model=base, data_path=data, output_dir=out, learning_rate=5e-3, lora_r=4, lora_alpha=8,
        logging_steps=1, report_to="none", seed=7, save_steps=1000, eval_steps=1000, group_by_length="false",
        dtype="float32", **COMMON,
    )
    args.update(kw)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def losses(out_dir):
    with open(Path(out_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def adapter(out_dir):
    return load_file(str(Path(out_dir) / "adapter_model.safetensors"))


@pytest.fixture
def data(tmp_path):
    rows = [{"instruction": f"问题{i}：{'天空为什么是蓝色的' if i % 2 else '一加一等于几'}？", "input": "",
             "output": "【答】" + "这是因为阳光被散射。" * ((i * 7) % 9) + "希望对你有帮助！"} for i in range(24)]
    return write_jsonl(tmp_path / "varied.jsonl", rows)


@pytest.fixture
def one_process(tiny_model_dir, data, tmp_path):
    out = tmp_path / "one"
    run_training(load_config(None, flags(tiny_model_dir, data, out)), progress_bar=False)
    return out


def assert_same_run(a_dir, b_dir):
    la, lb = losses(a_dir), losses(b_dir)
    assert sorted(la) == sorted(lb) == [1, 2]
    for k in la:
        assert abs(la[k] - lb[k]) < 1e-5, (k, la[k], lb[k])
    a, b = adapter(a_dir), adapter(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")


# ------------------------------------------------------------------------------------------ DeepSpeed
def test_deepspeed_engine_boundary_only_on_the_last_micro_batch(tiny_model_dir, data, tmp_path):
    """accelerate's DeepSpeed wrapper marks a gradient-accumulation boundary, and steps the engine, in every
    backward() where ``sync_gradients`` is set: it must be set on the step's last micro-batch only, so one
    optimizer step consumes batch_size samples (it used to be set on every micro-batch)."""
    t = Trainer(load_config(None, flags(tiny_model_dir, data, tmp_path / "ds")), progress_bar=False).setup()
    acc = t.accelerator
    seen = []
    real = acc.backward

    def spy(loss, **kw):
        seen.append(acc.sync_gradients)
        return real(loss, **kw)

    acc.backward = spy
    t.train()
    assert seen == [False, False, False, True] * 2  # 4 micro-batches per step, 2 steps


DS_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 2
  gradient_accumulation_steps: 1
  gradient_clipping: 1.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
"""


@pytest.mark.gpu
def test_deepspeed_zero2_matches_one_process(tiny_model_dir, data, tmp_path, one_process):
    """DeepSpeed ZeRO-2 on the GPUs (up to 2 processes): the 1-process run's adapter.

    Not on a CPU-only machine: accelerate 1.15 takes DeepSpeed only with ``cpu=False`` and then finds
    no device (each rank believes it is alone), so ZeRO cannot run on DeepSpeed's CPU accelerator through it.
    """
    pytest.importorskip("deepspeed")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n = min(2, torch.cuda.device_count())
    cfg = tmp_path / "ds.yaml"
    cfg.write_text(DS_CONFIG.replace("num_processes: 2", f"num_processes: {n}").replace("mixed_precision: 'no'\n", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port",
           str(free_port()), "-m", "chinese_vicuna", "train", *flags(tiny_model_dir, data, tmp_path / "ds")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"engine: DEEPSPEED, {n} process" in proc.stdout
    assert_same_run(one_process, tmp_path / "ds")


# ---------------------------------------------------------------------------------------------- FSDP
FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_reshard_after_forward: true
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
"""


@pytest.mark.slow
def test_fsdp_config_on_cpu_runs_ddp_says_so_and_matches_one(tiny_model_dir, data, tmp_path, one_process):
    """accelerate's FSDP2 config on CPU, 2 processes. accelerate 1.15 applies FSDP only on accelerators
    (state.py sets DistributedType.FSDP for MULTI_GPU/NPU/XPU..., never MULTI_CPU) and says nothing: the
    trainer says so, and the run is gloo DDP with the 1-process run's adapter. On GPUs: the gpu test below."""
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(FSDP_CONFIG)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port",
           str(free_port()), "-m", "chinese_vicuna", "train", *flags(tiny_model_dir, data, tmp_path / "fsdp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "engine: MULTI_CPU, 2 processes on cpu" in proc.stdout
    assert ("warning: the launch config asks for FSDP, but accelerate runs MULTI_CPU on cpu (its FSDP needs a GPU): "
            "plain data parallel, nothing sharded") in proc.stdout
    assert_same_run(one_process, tmp_path / "fsdp")


@pytest.mark.gpu
def test_fsdp_on_gpus_matches_one_process(tiny_model_dir, data, tmp_path, one_process):
    """accelerate's FSDP2 on the GPUs (up to 2 processes, NCCL): the 1-process run's adapter."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n = min(2, torch.cuda.device_count())
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text(FSDP_CONFIG.replace("use_cpu: true", "use_cpu: false").replace("num_processes: 2",
                                                                                   f"num_processes: {n}"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port",
           str(free_port()), "-m", "chinese_vicuna", "train", *flags(tiny_model_dir, data, tmp_path / "fsdp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"engine: FSDP, {n} process" in proc.stdout
    assert_same_run(one_process, tmp_path / "fsdp")


def test_fsdp2_sharded_adapter_saves_whole(tiny_model, tmp_path):
    """FSDP2 turns parameters into DTensors (``save_pretrained`` on them failed on a GPU: "Attempted to access
    the data pointer on an invalid python storage"). The checkpoint and the final save gather the shards
    first: the saved adapter equals the unsharded weights. FSDP2 on one gloo process."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from chinese_vicuna.train.checkpoint import gathered_state_dict, save_pretrained

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    want = {k.replace(".default", ""): v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    assert gathered_state_dict(model) is None  # nothing sharded: plain save_pretrained
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert lora and all(isinstance(p, DTensor) for p in lora)  # really sharded: what is saved is gathered
        save_pretrained(model, tmp_path / "gathered", gathered_state_dict(model))
    finally:
        dist.destroy_process_group()
    saved = load_file(str(tmp_path / "gathered" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(want) and len(saved) == 8
    for k in want:
        assert torch.equal(saved[k], want[k]), k


# ------------------------------------------------------------------------------------------ multi-node
@pytest.mark.slow
def test_multinode_two_nodes_c10d_match_one(tiny_model_dir, data, tmp_path, one_process):
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice on the loopback with a c10d rendezvous (two
    'nodes' on this machine): the same adapter as one process."""
    port = free_port()
    out = tmp_path / "multinode"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cv-test",
               "--node-rank", str(node),
               "-m", "chinese_vicuna", "train", *flags(tiny_model_dir, data, out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                                      cwd=ROOT))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    assert_same_run(one_process, out)


# ------------------------------------------------------------------------------------------------ Ray
@pytest.mark.slow
def test_ray_two_workers_match_one(tiny_model_dir, data, tmp_path, one_process):
    """``train --launcher ray --num_workers 2`` on a local 2-worker Ray cluster (CPU, gloo): DDP's adapter."""
    pytest.importorskip("ray.train")
    out = tmp_path / "ray"
    code = textwrap.dedent("""
        import sys
        import ray
        ray.init(num_cpus=2, include_dashboard=False)
        from chinese_vicuna.cli import main
        sys.exit(main(["train", *sys.argv[1:]]))
    """)
    cmd = [sys.executable, "-c", code, *flags(tiny_model_dir, data, out, launcher="ray", num_workers=2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert f"adapter written to {out}" in proc.stdout
    assert_same_run(one_process, out)
