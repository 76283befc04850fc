"""Real ``chinese-vicuna serve`` processes on 127.0.0.1 for the API tests (started once per module)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT

API_KEY = "test-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess; ``ready()`` waits (bounded) for /health."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.api_key = env.get("CHINESE_VICUNA_API_KEY")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "chinese_vicuna", "serve", *args, "--port", str(self.port)]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._ready = False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def ready(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {timeout}s:\n{self.tail()}")
            try:
                self._ready = httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        return self

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _env(api_key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CHINESE_VICUNA_API_KEY"}
    # One intra-op thread: on a shared 2-core machine torch's spinning worker threads slow a
    # tiny model down by 10-30x when other processes are busy.
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if api_key:
        env["CHINESE_VICUNA_API_KEY"] = api_key
    return env


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_model_dir, tiny_adapter_dir):
    """Both servers start together (their imports overlap); each test waits only for the one it uses."""
    logs = tmp_path_factory.mktemp("serve-logs")
    common = ["--model", str(tiny_model_dir), "--adapter", f"a={tiny_adapter_dir}"]
    procs = {
        "main": ServerProcess(common + ["--max-queue", "256"], logs / "main.log", _env(None)),
        # Key from the environment (the --api-key flag is covered by a unit test).
        "busy": ServerProcess(common + ["--max-concurrency", "1", "--max-queue", "1"], logs / "busy.log",
                              _env(API_KEY)),
    }
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture
def api_server(servers) -> ServerProcess:
    return servers["main"].ready()


@pytest.fixture
def busy_server(servers) -> ServerProcess:
    return servers["busy"].ready()
