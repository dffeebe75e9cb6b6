"""`python -m bench.catalogue_load`: it writes the catalogue it reads, reads it in a fresh
process, and refuses a database that holds other slices. Timings are not checked."""

from __future__ import annotations

import re
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.catalogue_load", *args],
                          capture_output=True, text=True, check=False)


def test_the_benchmark_reads_the_catalogue_it_wrote(tmp_path):
    done = _run("--slices", "700", "--repeat", "1", "--work", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "writing 700 slices ... " in done.stdout
    assert '"slices": 700' in done.stdout
    assert re.search(r"read_view of 700 slices, median of 1: \d+\.\d s, peak \+\d+ MiB, "
                     r"kept \+\d+ MiB", done.stdout), done.stdout
    again = _run("--slices", "700", "--repeat", "1", "--work", str(tmp_path))
    assert again.returncode == 0 and "writing" not in again.stdout, again.stdout
    other = _run("--slices", "900", "--repeat", "1", "--db",
                 f"sqlite:///{tmp_path / 'catalog-700.sqlite'}")
    assert other.returncode == 2 and "holds 700 slices, not 900" in other.stderr, other.stderr
