"""`make demo` checks its port before any work, and the README says how to change it."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_demo_checks_the_port_before_anything_else():
    plan = _make("-n", "demo").stdout.splitlines()
    first_work = next(i for i, line in enumerate(plan) if "venv" in line or "cbir" in line)
    port_check = next(i for i, line in enumerate(plan) if "s.bind((" in line)
    assert port_check < first_work, plan


def test_a_taken_port_is_named_with_the_variable_that_changes_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _make("check-port", f"PORT={port}")
    assert r.returncode != 0
    assert f"cannot serve on 127.0.0.1:{port}: the port is in use" in r.stderr
    assert "make demo PORT=8001" in r.stderr and "HOST=" in r.stderr
    assert _make("check-port", f"PORT={port}").returncode == 0  # free again


def test_readme_shows_port_host_and_the_synthetic_folder_names(synth_cohort):
    readme = (ROOT / "README.md").read_text()
    assert "make demo PORT=" in readme and "HOST=" in readme
    folders = sorted(p.name for p in synth_cohort.iterdir() if p.is_dir())
    assert folders and all(re.fullmatch(r"SYN\d+_\d{4}", f) for f in folders), folders
    assert "SYN0_0003" in readme and "SYN<seed>_<n>/" not in readme
