"""`make test` says in one line at its end which system parts were missing and how to get them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "make test's workers"])
def test_skipped_browser_tests_are_named_at_the_end(tmp_path, workers):
    (tmp_path / "test_page.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.skip(\n"
        "    reason='needs /usr/bin/chromium (Debian package chromium)')\n"
        "def test_a():\n    pass\n"
        "def test_b():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q",
                          "-p", "no:cacheprovider", *workers, str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()
    line = next(x for x in last if "tests skipped" in x)
    assert line.startswith("2 tests skipped: needs /usr/bin/chromium")
    assert "apt-get install chromium" in line
