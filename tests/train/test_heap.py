"""The C allocator of a training process: jemalloc by re-executing ``train`` once, glibc when asked."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, run_flags

from chinese_vicuna.train import heap


def test_wanted_follows_the_setting(monkeypatch):
    monkeypatch.delenv(heap.REEXEC_MARK, raising=False)
    monkeypatch.setattr(heap, "loaded_allocator", lambda: "glibc")
    monkeypatch.setattr(heap, "find_jemalloc", lambda: "/lib/libjemalloc.so.2")
    assert heap.wanted("auto") == "/lib/libjemalloc.so.2"
    assert heap.wanted("jemalloc") == "/lib/libjemalloc.so.2"
    assert heap.wanted("glibc") is None
    monkeypatch.setenv(heap.REEXEC_MARK, "/lib/libjemalloc.so.2")  # re-executed once already: never loop
    assert heap.wanted("auto") is None
    monkeypatch.delenv(heap.REEXEC_MARK)
    monkeypatch.setattr(heap, "find_jemalloc", lambda: None)
    assert heap.wanted("auto") is None
    with pytest.raises(FileNotFoundError, match="apt-get install libjemalloc2"):
        heap.wanted("jemalloc")
    monkeypatch.setattr(heap, "loaded_allocator", lambda: "jemalloc")
    assert heap.wanted("jemalloc") is None  # already running on it


def _train(tiny_model_dir, alpaca_file, out, *extra):
    flags = run_flags(tiny_model_dir, alpaca_file, out, max_steps=1, batch_size=2, micro_batch_size=2)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", heap.REEXEC_MARK)}
    return subprocess.run([sys.executable, "-m", "chinese_vicuna", "train", *flags, *extra], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-execution is Linux's")
def test_train_runs_on_the_allocator_asked_for(tiny_model_dir, alpaca_file, tmp_path):
    glibc = _train(tiny_model_dir, alpaca_file, tmp_path / "glibc", "--cpu_allocator", "glibc")
    assert glibc.returncode == 0, glibc.stderr[-3000:]
    assert "allocator glibc" in glibc.stdout
    auto = _train(tiny_model_dir, alpaca_file, tmp_path / "auto")
    assert auto.returncode == 0, auto.stderr[-3000:]
    want = "jemalloc" if heap.find_jemalloc() else "glibc"
    assert f"allocator {want}" in auto.stdout
    assert auto.stdout.count("engine:") == 1  # one run, whatever re-executed before it
    # the same run either way: the allocator changes where tensors live, not what they hold
    a = (tmp_path / "glibc" / "metrics.csv").read_text().splitlines()[1].split(",")[2]
    b = (tmp_path / "auto" / "metrics.csv").read_text().splitlines()[1].split(",")[2]
    assert a == b
