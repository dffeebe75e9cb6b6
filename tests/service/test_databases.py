"""The service on each catalogue database: SQLite and PostgreSQL (the compose deployment's)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from indexer.build import Indexer
from service.api.app import create_app
from service.config import Settings


def test_service_reads_its_catalogue_from_either_database(db_url, synth_cohort, tiny_checkpoint,
                                                          tmp_path, indexed_png):
    index = tmp_path / "index"
    Indexer(index, db_url=db_url).build([synth_cohort], checkpoint=tiny_checkpoint,
                                        progress=False, workers=0)
    with TestClient(create_app(Settings(index_dir=index))) as c:  # the URL from index.json
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["slices"] > 0
        r = c.post("/search?space=concat&k=3", files={"file": ("q.png", indexed_png.read_bytes())})
        assert r.status_code == 200 and r.json()["neighbors"][0]["distance"] == 0.0
        first = r.json()["neighbors"][0]
        patient = c.get(f"/patients/{first['patient_id']}").json()
        assert first["slice_id"] in {s["slice_id"] for s in patient["slices"]}
        assert c.get(f"/slices/{first['slice_id']}").json()["patient_id"] == first["patient_id"]
