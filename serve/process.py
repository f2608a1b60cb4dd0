"""Running `python -m serve` as a child process (tests, benchmarks, scripts): free port, wait for /ready, stop."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # python -m serve runs from here


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def data_uri(path: str) -> str:
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode()


class ServerProcess:

  def __init__(self, args: list[str], ready_timeout_s: float = 300.0):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = tempfile.NamedTemporaryFile("w+", prefix="dsocr-serve-", suffix=".log", delete=False)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    self.proc = subprocess.Popen([sys.executable, "-m", "serve", "--port", str(self.port), *args], cwd=REPO,
                                 stdout=self.log, stderr=subprocess.STDOUT, env=env)
    self._wait_ready(ready_timeout_s)

  def _wait_ready(self, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.output()}")
      with contextlib.suppress(httpx.HTTPError):
        if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
          return
      time.sleep(0.5)
    self.stop()
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.output()}")

  def output(self) -> str:
    self.log.flush()
    with open(self.log.name) as f:
      return f.read()[-6000:]

  def terminate(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)

  def stop(self, timeout_s: float = 30.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    self.terminate()
    try:
      self.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self.log.close()
    with contextlib.suppress(OSError):
      os.unlink(self.log.name)
    return self.proc.returncode

  def metric(self, name: str) -> float:
    """Value of an unlabelled sample in /metrics."""
    for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
      if line.startswith(name + " "):
        return float(line.split()[1])
    raise KeyError(name)
