"""The real server process (`cbir serve`), where an in-process client would hide the behaviour:
its peak memory under hostile and large concurrent uploads (read from /proc), and its log output,
which must name route templates and never a patient identifier."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.service.conftest import _free_port

CBIR = str(Path(sys.executable).parent / "cbir")
DECODE_MEMORY_MB = 200  # the server's decoding budget here (CBIR_DECODE_MEMORY_MB)
CONCURRENT = 8


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


@pytest.fixture(scope="module")
def server(service_index, tmp_path_factory):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    port = _free_port()
    env = {**os.environ, "CBIR_DECODE_MEMORY_MB": str(DECODE_MEMORY_MB)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([CBIR, "serve", "--index", str(service_index), "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError("cbir serve exited:\n" + log_path.read_text())
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("cbir serve did not become ready:\n" + log_path.read_text())
            time.sleep(0.5)
        yield url, proc.pid, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _post_all(url: str, payloads: list[bytes], name: str) -> list[httpx.Response]:
    """Send every payload at once, each from its own client thread. ``preprocess=false``: these
    are decoding's bounds; registering an off-grid volume (seconds each) is ``ingest``'s."""
    responses: list[httpx.Response | None] = [None] * len(payloads)
    start = threading.Barrier(len(payloads))

    def send(i: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as client:
            start.wait()
            responses[i] = client.post("/search?k=3&preprocess=false",
                                       files={"file": (name, payloads[i])})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses


def _gzip_bomb(inflated_gib: float = 1.0) -> bytes:
    """About 1 MB of .nii.gz: a header declaring a 64^3 int16 volume (512 KiB of data), then a
    stream inflating to ``inflated_gib`` GiB."""
    img = nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4))
    head = img.header.binaryblock + b"\0" * 4
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    parts = [comp.compress(head)]
    parts += [comp.compress(chunk) for _ in range(int(inflated_gib * 1024))]
    return b"".join(parts) + comp.flush()


def _large_volume(seed: int) -> bytes:
    """An honest 256 x 256 x 160 int16 volume (20 MiB inflated) with brain-like content, which
    compresses to a few hundred kB: each decode needs about 150 MB of working memory."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((256, 256, 160), np.int16)
    x, y, z = np.ogrid[:256, :256, :160]
    vol[((x - 128) ** 2 + (y - 128) ** 2 + ((z - 80) * 1.6) ** 2) < 100 ** 2] = 400
    vol[96:160, 96:160, 60:100] += rng.integers(0, 800, (64, 64, 40), dtype=np.int16)
    return gzip.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes(), compresslevel=6)


def test_concurrent_gzip_bombs_and_large_volumes_stay_within_bounds(server, capsys):
    url, pid, _ = server
    warm = _post_all(url, [_large_volume(0)], "warm.nii.gz")  # model, FAISS, allocator warm
    assert warm[0].status_code == 200, warm[0].text
    before = _peak_rss_mb(pid)

    bomb = _gzip_bomb(1.0)
    assert len(bomb) < 1.2e6
    answers = _post_all(url, [bomb] * CONCURRENT, "bomb.nii.gz")
    assert [r.status_code for r in answers] == [413] * CONCURRENT, [r.text for r in answers]
    assert all("inflates past the" in r.json()["detail"] for r in answers)
    after_bombs = _peak_rss_mb(pid)

    # Honest volumes, each needing about 150 MB to decode, against a 200 MB budget: they decode
    # one at a time instead of eight at once (about 1.2 GB).
    volumes = [_large_volume(i) for i in range(CONCURRENT)]
    answers = _post_all(url, volumes, "volume.nii.gz")
    assert [r.status_code for r in answers] == [200] * CONCURRENT, [r.text[:300] for r in answers]
    after_volumes = _peak_rss_mb(pid)

    with capsys.disabled():
        print(f"\nserver peak RSS: {before:.0f} MB warm; {after_bombs:.0f} MB after "
              f"{CONCURRENT} concurrent 1 GiB gzip bombs (+{after_bombs - before:.0f} MB); "
              f"{after_volumes:.0f} MB after {CONCURRENT} concurrent 20 MiB volumes with a "
              f"{DECODE_MEMORY_MB} MB decode budget (+{after_volumes - before:.0f} MB)")
    assert after_bombs - before < 100, "bombs were inflated past what they declare"
    assert after_volumes - before < DECODE_MEMORY_MB + 150, "decodes ran past the budget"


def test_the_log_names_route_templates_not_patients(server, retrieval):
    url, _, log_path = server
    pid = sorted(retrieval.patient_by_external)[0]
    slice_id = int(retrieval.slice_ids[0])
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.get(f"/patients/{pid}").status_code == 200
        assert client.get("/patients/NOT-A-PATIENT-42").status_code == 404
        assert client.get(f"/slices/{slice_id}/image.png").status_code == 200
        assert client.post(f"/slices/{slice_id}/similar?k=2").status_code == 200
        r = client.post(f"/search?k=2&exclude_patient={pid}",
                        files={"file": ("q.nii.gz", _large_volume(1))})
        assert r.status_code == 200, r.text
        assert client.get(f"/no/such/path/{pid}").status_code == 404
    time.sleep(0.5)  # let the server flush its log
    log = log_path.read_text()
    for identifier in [*retrieval.patient_by_external, "NOT-A-PATIENT-42"]:
        assert identifier not in log, f"{identifier} in the server log"
    for line in ("GET /patients/{patient_id} 200", "GET /patients/{patient_id} 404",
                 "GET /slices/{slice_id}/image.png 200", "POST /slices/{slice_id}/similar 200",
                 "POST /search 200", "GET unmatched 404"):
        assert line in log, f"{line!r} not in the server log:\n{log}"
    assert f"/slices/{slice_id}" not in log  # ids in paths are not logged either
