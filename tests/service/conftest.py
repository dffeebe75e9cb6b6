"""Service fixtures: a real index (tiny checkpoint, synthetic cohort), the real app in-process
(TestClient) and served over a socket by uvicorn (for the browser), and query files exported from
indexed slices through the shared preprocessing."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from indexer.build import Indexer
from ingest.layouts import find_cases
from ingest.volumes import load_case
from model.data.dataset import case_slices
from model.data.preprocess import INTENSITY_PERCENTILE, slice_to_png
from service.api.app import create_app
from service.config import Settings
from service.retrieval import Retrieval

API_KEY = "test-key-7f3a"


@dataclass(frozen=True)
class IndexedSlice:
    """A slice of the index, as the indexer read it."""

    slice_id: int
    patient_id: str
    slice_index: int
    image: np.ndarray  # (256, 256) float32
    has_abnormality: bool


@pytest.fixture(scope="session")
def service_index(synth_cohort, tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("service") / "index"
    Indexer(out).build([synth_cohort], checkpoint=tiny_checkpoint, progress=False, workers=0)
    return out


@pytest.fixture(scope="session")
def retrieval(service_index) -> Retrieval:
    r = Retrieval.open(service_index)
    yield r
    r.close()


@pytest.fixture(scope="session")
def indexed_slices(synth_cohort, retrieval) -> list[IndexedSlice]:
    """Four slices with distinct codes in every space: two with a lesion, two without, from
    different patients; each one that a 2-D export carries whole, i.e. whose own 99.5th
    percentile is its volume's scale (preprocess rule 6: such a slice comes back unchanged from
    a PNG or JPEG upload, where others come back brighter)."""
    cases = {c.pid: c for c in find_cases(synth_cohort).cases}
    flat = retrieval.codes.reshape(len(retrieval.codes), 2, -1)

    def candidates(ext: str, pid: int, want: bool) -> list[IndexedSlice]:
        stacks = case_slices(load_case(cases[ext], with_healthy=False))
        rows = np.flatnonzero(retrieval.slice_patient == pid)
        found = []
        for row in rows[len(rows) // 4: 3 * len(rows) // 4]:
            if (retrieval.slice_abnormal[row] == 1) != want:
                continue
            twins = (flat == flat[row]).all(-1)  # (N, 2): same normal / abnormal code
            if twins[:, 0].sum() > 1 or twins[:, 1].sum() > 1:
                continue  # another slice shares a code: "first" would be a tie
            at = int(np.flatnonzero(stacks.slice_index == retrieval.slice_index[row])[0])
            image = stacks.image[at]
            if np.percentile(image[image > 0], INTENSITY_PERCENTILE) < 1.0:
                continue
            found.append(IndexedSlice(int(retrieval.slice_ids[row]), ext,
                                      int(retrieval.slice_index[row]), image, want))
        return found

    wants = (True, False, True, False)
    patients = sorted(retrieval.patient_by_external.items())
    options = {(ext, want): candidates(ext, pid, want)
               for ext, pid in patients for want in (True, False)}
    picked: list[IndexedSlice] = []
    # The first assignment of four different patients to the four statuses that has a slice
    # for each (a greedy pick in patient order can use up the only patient left for one).
    for order in itertools.permutations([ext for ext, _ in patients], len(wants)):
        if all(options[(ext, want)] for ext, want in zip(order, wants, strict=True)):
            picked = [options[(ext, want)][0] for ext, want in zip(order, wants, strict=True)]
            break
    assert len(picked) == 4, "the cohort should give two lesion and two lesion-free slices"
    return picked


@pytest.fixture(scope="session")
def query_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("queries")


@pytest.fixture(scope="session")
def indexed_png(indexed_slices, query_dir) -> Path:
    """A 16-bit PNG of an indexed lesion slice (16-bit: the round trip keeps its codes)."""
    path = query_dir / "indexed.png"
    path.write_bytes(slice_to_png(indexed_slices[0].image, bits=16))
    return path


@pytest.fixture(scope="session")
def other_png(indexed_slices, query_dir) -> Path:
    """A 16-bit PNG of an indexed lesion-free slice of another patient."""
    path = query_dir / "other.png"
    path.write_bytes(slice_to_png(indexed_slices[1].image, bits=16))
    return path


@pytest.fixture(scope="session")
def indexed_nifti(synth_cohort, indexed_slices, query_dir) -> Path:
    """The t1ce volume of the patient of ``indexed_png``, as uploaded (.nii.gz)."""
    case = next(c for c in find_cases(synth_cohort).cases
                if c.pid == indexed_slices[0].patient_id)
    path = query_dir / "volume.nii.gz"
    path.write_bytes(case.t1ce.read_bytes())
    return path


@pytest.fixture(scope="session")
def client(service_index) -> TestClient:
    with TestClient(create_app(Settings(index_dir=service_index))) as c:
        yield c


@pytest.fixture(scope="session")
def keyed_client(service_index) -> TestClient:
    with TestClient(create_app(Settings(index_dir=service_index, api_key=API_KEY))) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(settings: Settings) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="session")
def live_server(service_index) -> str:
    url, server, thread = _serve(Settings(index_dir=service_index))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server_with_key(service_index) -> tuple[str, str]:
    url, server, thread = _serve(Settings(index_dir=service_index, api_key=API_KEY))
    yield url, API_KEY
    server.should_exit = True
    thread.join(timeout=10)


def nifti_bytes(volume: np.ndarray, affine: np.ndarray | None = None, gz: bool = True) -> bytes:
    """A NIfTI-1 file of ``volume`` in memory (gzipped by default)."""
    img = nib.Nifti1Image(volume, np.eye(4) if affine is None else affine)
    raw = img.to_bytes()
    if not gz:
        return raw
    import gzip

    return gzip.compress(raw, compresslevel=1)


SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "cbir-cpu.pt"


@pytest.fixture(scope="session")
def shipped_index(synth_cohort, tmp_path_factory) -> Path:
    """The session cohort indexed with the shipped checkpoint (``checkpoints/cbir-cpu.pt``):
    for tests of what the trained weights do, beyond the invariants any weights keep."""
    out = tmp_path_factory.mktemp("shipped") / "index"
    Indexer(out).build([synth_cohort], checkpoint=SHIPPED, progress=False, workers=0)
    return out


@pytest.fixture(scope="session")
def shipped_client(shipped_index) -> TestClient:
    with TestClient(create_app(Settings(index_dir=shipped_index))) as c:
        yield c
