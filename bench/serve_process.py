"""``cbir serve`` in a process of its own on 127.0.0.1, for the campaign and the tests that need
the real server: started, probed, killed with SIGKILL and started again on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

CBIR = str(Path(sys.executable).parent / "cbir")


class ServeProcess:
    def __init__(self, index: Path, port: int, log_path: Path, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 300):
        self.index = Path(index)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start and wait until /readyz answers 200; returns the seconds that took."""
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [CBIR, "serve", "--index", str(self.index), "--host", "127.0.0.1", "--port",
                 str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.starts += 1
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cbir serve exited ({self.proc.returncode}):\n"
                                   + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() - started > self.ready_timeout_s:
                self.stop()
                raise RuntimeError("cbir serve did not become ready:\n"
                                   + self.log_path.read_text()[-3000:])
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def _get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def ready(self) -> dict:
        """/readyz's body; raises unless it answers 200."""
        r = self._get("/readyz")
        r.raise_for_status()
        return r.json()

    def info(self) -> dict:
        r = self._get("/info")
        r.raise_for_status()
        return r.json()

    def patients(self) -> set[str]:
        r = self._get("/patients")
        r.raise_for_status()
        return {p["patient_id"] for p in r.json()}

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
