"""/healthz, /readyz, /metrics, /info; the event loop keeps answering while the model works."""

from __future__ import annotations

import shutil
import threading
import time

import httpx

from service.retrieval import Retrieval


def test_health_and_readiness(client, retrieval):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "generation": retrieval.build.generation,
                     "slices": len(retrieval.slice_ids),
                     "active_generation": retrieval.build.generation, "refused": None}


def test_readiness_fails_when_index_and_catalogue_disagree(service_index):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings

    broken = Retrieval.open(service_index)
    try:
        broken.indices["abnormal"].remove_ids(broken.slice_ids[:1].copy())  # a vector lost
        with TestClient(create_app(Settings(index_dir=service_index), broken)) as c:
            r = c.get("/readyz")
            assert r.status_code == 503
            assert "abnormal index holds" in r.json()["detail"]
    finally:
        broken.close()


def test_info_describes_the_index(client, retrieval):
    info = client.get("/info").json()
    assert info["slices"] == len(retrieval.slice_ids) and info["preset"] == "tiny"
    assert info["spaces"] == ["normal", "abnormal", "concat"] and info["max_k"] == 100


def test_metrics_count_requests_and_stages(client, indexed_png):
    client.post("/search?k=1", files={"file": ("q.png", indexed_png.read_bytes())})
    text = client.get("/metrics").text
    for stage in ("decode", "encode", "search", "catalogue", "render"):
        line = next(x for x in text.splitlines()
                    if x.startswith(f'cbir_stage_seconds_count{{stage="{stage}"}}'))
        assert float(line.split()[-1]) >= 1, stage
    assert 'cbir_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'cbir_request_seconds_bucket{le="0.001",route="/search"}' in text


def test_healthz_answers_while_searches_run(live_server, indexed_png):
    data = indexed_png.read_bytes()
    done = []

    def search():
        with httpx.Client(base_url=live_server, timeout=120) as c:
            r = c.post("/search?space=concat&k=5", files={"file": ("q.png", data)})
            done.append(r.status_code)

    threads = [threading.Thread(target=search) for _ in range(6)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=live_server, timeout=30) as c:
        answered_while_busy = 0
        while any(t.is_alive() for t in threads):
            if c.get("/healthz").status_code == 200 and len(done) < len(threads):
                answered_while_busy += 1
    for t in threads:
        t.join()
    assert done == [200] * 6
    assert answered_while_busy >= 1


def test_a_patient_removed_while_serving_is_gone_within_seconds(synth_cohort, tiny_checkpoint,
                                                                tmp_path):
    """A patient removed while serving: the server loads the new generation by itself, stays
    ready, and no longer returns the patient, its slices or its images."""
    from fastapi.testclient import TestClient

    from indexer.build import Indexer
    from service.api.app import create_app
    from service.config import Settings

    index = tmp_path / "index"
    Indexer(index).build([synth_cohort], checkpoint=tiny_checkpoint, progress=False, workers=0)
    with TestClient(create_app(Settings(index_dir=index, reload_interval_s=0.2))) as c:
        before = c.get("/info").json()["generation"]
        sid = int(c.app.state.retrieval.slice_ids[0])
        victim = c.get(f"/slices/{sid}").json()
        report = Indexer(index).remove([victim["patient_id"]])
        deadline = time.monotonic() + 30
        while c.get("/info").json()["generation"] == before:
            assert c.get("/readyz").status_code == 200
            assert time.monotonic() < deadline, "the new generation was not served"
            time.sleep(0.1)
        ready = c.get("/readyz").json()
        assert ready["generation"] == ready["active_generation"] == report.generation
        assert c.get(f"/slices/{sid}").status_code == 404
        assert c.get(f"/slices/{sid}/image.png").status_code == 404
        assert c.get(f"/patients/{victim['patient_id']}").status_code == 404
        r = c.post(f"/slices/{int(c.app.state.retrieval.slice_ids[0])}/similar?k=100")
        assert victim["patient_id"] not in {n["patient_id"] for n in r.json()["neighbors"]}


def test_info_shows_the_checkpoint_note(service_index, tiny_checkpoint, tmp_path):
    """No note on the test checkpoint; an exported copy with a note (same weights, so the index
    accepts it) shows it in /info."""
    from fastapi.testclient import TestClient

    from model.checkpoint import export_checkpoint
    from service.api.app import create_app
    from service.config import Settings

    noted = tmp_path / "noted.pt"
    export_checkpoint(tiny_checkpoint, noted, note="trained on synthetic data only")
    for checkpoint, expected in ((None, None), (noted, "trained on synthetic data only")):
        with TestClient(create_app(Settings(index_dir=service_index,
                                            checkpoint=checkpoint))) as c:
            assert c.get("/info").json()["model_note"] == expected


def test_info_shows_the_eval_headline_the_checkpoint_carries(service_index, tiny_checkpoint,
                                                            tmp_path):
    """cbir export-checkpoint --eval-report puts a cbir eval run's headline into the shipped
    checkpoint; the service shows it in /info; a report of other weights is refused."""
    import json

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from model.checkpoint import read_checkpoint
    from service.api.app import create_app
    from service.cli import app
    from service.config import Settings

    sha = read_checkpoint(tiny_checkpoint)["weights_sha256"]
    headline = {"k": 5, "figures": [{"space": "normal", "figure": "normal_dice", "model": 0.7,
                                     "pixels": 0.6, "random": 0.3, "oracle": 0.8}]}
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"headline": headline, "command": "cbir eval --index x",
                                  "checkpoint": {"weights_sha256": sha}}))
    shipped = tmp_path / "shipped.pt"
    result = CliRunner().invoke(app, ["export-checkpoint", "--checkpoint", str(tiny_checkpoint),
                                      "--out", str(shipped), "--eval-report", str(report)])
    assert result.exit_code == 0, result.output
    with TestClient(create_app(Settings(index_dir=service_index, checkpoint=shipped))) as c:
        shown = c.get("/info").json()["eval_headline"]
    assert shown["figures"] == headline["figures"] and shown["command"] == "cbir eval --index x"
    report.write_text(json.dumps({"headline": headline, "command": "cbir eval",
                                  "checkpoint": {"weights_sha256": "0" * 64}}))
    result = CliRunner().invoke(app, ["export-checkpoint", "--checkpoint", str(tiny_checkpoint),
                                      "--out", str(tmp_path / "other.pt"), "--eval-report",
                                      str(report)])
    assert result.exit_code == 2 and "evaluated other weights" in result.output


def test_head_answers_like_get(client):
    for path in ("/healthz", "/readyz"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.content == b""


def test_every_response_is_counted_under_its_route_template(service_index, indexed_png):
    """/docs, /openapi.json and static files under their own templates, not 'unmatched'; a
    body refused for its size (413, before any route runs) under the route it was sent to."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings

    with TestClient(create_app(Settings(index_dir=service_index, max_upload_mb=0.05))) as c:
        assert c.get("/docs").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/static/style.css").status_code == 200
        assert c.get("/slices/1/image.png").status_code in (200, 404)
        assert c.post("/search", files={"file": ("q.png", b"\0" * 100_000)}).status_code == 413
        assert c.get("/no/such/page").status_code == 404
        text = c.get("/metrics").text
    for method, route, status in (("GET", "/docs", 200), ("GET", "/openapi.json", 200),
                                  ("GET", "/static", 200), ("POST", "/search", 413),
                                  ("GET", "unmatched", 404)):
        assert (f'cbir_requests_total{{method="{method}",route="{route}",status="{status}"}} 1.0'
                in text), (method, route, status)
    assert 'route="/slices/{slice_id}/image.png"' in text


def test_the_model_card_beside_the_checkpoint_is_served(client, service_index, tiny_checkpoint,
                                                        tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.config import Settings

    r = client.get("/model-card")  # the test checkpoint has no card beside it
    assert r.status_code == 404 and "no model card" in r.json()["detail"]
    assert client.get("/info").json()["model_card"] is False
    copy = tmp_path / "carded.pt"
    shutil.copyfile(tiny_checkpoint, copy)
    copy.with_suffix(".md").write_text("# Model card\n\nTrained on phantoms.\n")
    with TestClient(create_app(Settings(index_dir=service_index, checkpoint=copy))) as c:
        assert c.get("/info").json()["model_card"] is True
        r = c.get("/model-card")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert r.text == "# Model card\n\nTrained on phantoms.\n"
