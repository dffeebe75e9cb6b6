"""Shared fixtures: one small synthetic cohort per test session (real files, real template)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from model.data.synth.cohort import synthesize

COHORT_SEED = 3
COHORT_PATIENTS = 4


def pytest_configure(config) -> None:
    """On pytest-xdist workers (`make test`), torch gets the worker's share of the cores: two
    workers of two threads each on two cores would wait on each other's spinning threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """``cbir synth --out DIR --patients 4 --seed 3`` written once; treat it as read-only."""
    out = tmp_path_factory.mktemp("cohort")
    synthesize(out, patients=COHORT_PATIENTS, seed=COHORT_SEED, workers=2, progress=False)
    return out


def _seed_codebooks(net, images) -> None:
    """Both codebooks from encoder outputs of ``images`` (a random codebook maps every slice to
    the same code); call under ``torch.no_grad`` with ``net`` in eval mode."""
    import torch

    normal, abnormal = net.encoder(images)  # (S, 64, 8, 8) each
    for quantizer, z in ((net.normal_quantizer, normal), (net.abnormal_quantizer, abnormal)):
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randperm(flat.shape[0])[: quantizer.codebook_size]
        quantizer.codebook.copy_(flat[pick])
        quantizer.codebook_sum.copy_(flat[pick] * quantizer.cluster_size[:, None])


@pytest.fixture(scope="session")
def tiny_checkpoint(synth_cohort, tmp_path_factory) -> Path:
    """A `tiny` checkpoint: untrained weights (retrieval invariants hold for any weights), with
    BatchNorm statistics moved off their initial values and both codebooks seeded from encoder
    outputs of real slices, so that slices get varied codes in both spaces (a random codebook
    maps every slice to the same abnormal code, which would make abnormal-space tests vacuous).
    """
    import torch

    from ingest.layouts import find_cases
    from ingest.volumes import load_case
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.data.dataset import case_slices
    from model.network import DecompositionNet

    torch.manual_seed(0)
    net = DecompositionNet(preset("tiny"))
    case = next(c for c in find_cases(synth_cohort).cases if c.pid.endswith("_0000"))
    images = torch.from_numpy(case_slices(load_case(case)).image[::2, None].copy())
    with torch.no_grad():
        net(images[:16])  # BatchNorm statistics from real slices
        net.eval()
        _seed_codebooks(net, images)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, net.eval(), "tiny")
    return path


@pytest.fixture(scope="session")
def phantom_checkpoint(tmp_path_factory) -> Path:
    """A `tiny` checkpoint, untrained, with BatchNorm statistics and both codebooks taken from
    phantom slices (as ``tiny_checkpoint`` does from a cohort) so that slices get varied codes."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.data import preprocess
    from model.network import DecompositionNet

    torch.manual_seed(0)
    net = DecompositionNet(preset("tiny"))
    from tests.ingest.series import phantom

    stacks = [preprocess.axial_slices(preprocess.normalize_intensity(phantom(seed)))[66:90:3]
              for seed in (0, 1)]
    images = torch.from_numpy(np.concatenate(stacks)[:, None].copy())
    with torch.no_grad():
        net.encoder(images)  # BatchNorm statistics of the encoder, the part codes come from
        net.eval()
        _seed_codebooks(net, images)
    path = tmp_path_factory.mktemp("ckpt") / "phantom-tiny.pt"
    save_checkpoint(path, net.eval(), "tiny")
    return path


@pytest.fixture(scope="session")
def phantom_index(phantom_checkpoint, tmp_path_factory) -> Path:
    """An index holding one NIfTI patient, ``PHANTOM0`` (phantom seed 0); copy it before
    adding to it."""
    from indexer.build import Indexer
    from ingest.cases import stage_case
    from model.data.nifti import Volume
    from tests.ingest.series import MODEL_AFFINE, phantom

    cohort = tmp_path_factory.mktemp("phantom-cohort")
    stage_case(cohort, "PHANTOM0", Volume(phantom(0), MODEL_AFFINE, Path("phantom")))
    out = tmp_path_factory.mktemp("phantom-index") / "index"
    Indexer(out).build([cohort], checkpoint=phantom_checkpoint, progress=False, workers=0)
    return out


@dataclass(frozen=True)
class DicomIndex:
    """``phantom_index`` plus one study added with `cbir index add --dicom`, and what the
    command printed and logged."""

    index: Path
    study_uid: str
    series_uid: str
    volume: np.ndarray  # the study's T1-Gd voxels as written (L-P-S order, MODEL_AFFINE)
    datasets: list  # its T1-Gd DICOM datasets (with a patient name and id in each)
    output: str
    log: str


@pytest.fixture(scope="session")
def dicom_index(phantom_index, tmp_path_factory) -> DicomIndex:
    import io
    import logging
    import shutil

    from typer.testing import CliRunner

    from service.cli import app
    from tests.ingest.series import MODEL_AFFINE, phantom, series_datasets, write_folder

    tmp = tmp_path_factory.mktemp("dicom-index")
    index = shutil.copytree(phantom_index, tmp / "index")
    volume = phantom(1)
    study = "1.2.826.0.1.3680043.8.498.77"
    t1gd = series_datasets(volume, MODEL_AFFINE, study_uid=study, description="T1 AX POST")
    flair = series_datasets(volume[:, :, :3], MODEL_AFFINE, study_uid=study,
                            description="FLAIR AX", agent="GADOBUTROL")
    folder = write_folder(t1gd + flair, tmp / "study")
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        result = CliRunner().invoke(app, ["-v", "index", "add", "--index", str(index),
                                          "--dicom", str(folder), "--workers", "0"])
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert result.exit_code == 0, result.output
    return DicomIndex(index, study, str(t1gd[0].SeriesInstanceUID), volume, t1gd,
                      result.output, captured.getvalue())


def _postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except Exception:
        return False


PG_ADMIN_DSN = os.environ.get("CBIR_TEST_PG", "host=127.0.0.1 port=5432 dbname=test")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty catalogue database: SQLite in tmp_path, or a new PostgreSQL database
    (created on the server at 127.0.0.1:5432, dropped afterwards).

    PostgreSQL tests skip when no server answers, unless CBIR_REQUIRE_POSTGRES=1 (CI), where
    they fail instead.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        return
    if not _postgres_available():
        if os.environ.get("CBIR_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required but not reachable at {PG_ADMIN_DSN}")
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_DSN}")
    import psycopg

    name = f"cbir_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_ADMIN_DSN.split())
    yield (f"postgresql+psycopg://{params.get('user', '')}@{params.get('host', '127.0.0.1')}:"
           f"{params.get('port', '5432')}/{name}")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_terminal_summary(terminalreporter) -> None:
    """One line per missing system part whose tests were skipped, with how to install it: a green
    run without the browser or the database tests should not pass for a full one."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(("needs ", "no PostgreSQL")):
            reasons[reason] = reasons.get(reason, 0) + 1
    hints = {"chromium": "apt-get install chromium (CI: CBIR_REQUIRE_BROWSER=1)",
             "PostgreSQL": "start the PostgreSQL server at 127.0.0.1:5432 (CI: "
                           "CBIR_REQUIRE_POSTGRES=1)",
             "Orthanc": "apt-get install orthanc orthanc-dicomweb (CI: CBIR_REQUIRE_ORTHANC=1)",
             "Ray": "pip install -e '.[ray]' (CI: CBIR_REQUIRE_RAY=1)"}
    for reason, count in sorted(reasons.items()):
        hint = next((h for key, h in hints.items() if key in reason), None)
        line = f"{count} test{'s' if count > 1 else ''} skipped: {reason}"
        if hint:
            line += f"; to run them: {hint}"
        terminalreporter.write_line(line, yellow=True, bold=True)
