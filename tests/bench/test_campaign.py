"""The load and faults campaign, shortened: load levels of a few seconds against a real
`cbir serve` on the tiny test model, with every fault injected. It must pass: no request lost
through the add, the remove, the half-way killed add and the killed and restarted server, and
no data lost. The flat index (the default kind) runs two levels, the faults spread over them;
the codebook index one level of four clients with every fault in it: the same faults on the
other kind's files, in less of the suite's time (108 s against 143 s, measured beside training)."""

from __future__ import annotations

import json

import pytest

from bench.campaign import Campaign, Fault, Level, _schedule, report
from indexer import store


@pytest.mark.parametrize(("kind", "clients"), [("flat", [1, 4]), ("codebook", [4])])
def test_the_shortened_campaign_loses_no_request_and_no_data(synth_cohort, tiny_checkpoint,
                                                            tmp_path, capsys, kind, clients):
    assert set(store.KINDS) == {"flat", "codebook"}  # a new kind gets its campaign here
    campaign = Campaign(synth_cohort, tiny_checkpoint, tmp_path / "work", base=1, seconds=5,
                        levels=clients, retry_s=120, queries=8, reload_interval_s=0.5, kind=kind)
    levels = campaign.run()
    text, passed = report(levels, campaign.data_problems)
    with capsys.disabled():
        print(text)
    assert passed, text
    assert [lv.clients for lv in levels] == clients
    assert all(lv.requests > 0 and lv.lost == 0 for lv in levels)
    faults = [f.name for lv in levels for f in lv.faults]
    assert faults == ["add", "remove", "kill -9 add", "kill -9 serve"]
    assert all(f.ok for lv in levels for f in lv.faults)
    # The load ran through the server's restart: its clients saw the outage and retried.
    assert levels[-1].errors > 0
    assert json.loads((tmp_path / "work" / "load-4-0.json").read_text())
    assert store.read_manifest(campaign.index)["kind"] == kind


def test_every_fault_is_scheduled_once_whatever_the_levels():
    assert _schedule(3) == [("add", "remove"), ("kill -9 add",), ("kill -9 serve",)]
    assert _schedule(2) == [("add", "remove"), ("kill -9 add", "kill -9 serve")]
    assert _schedule(1) == [("add", "remove", "kill -9 add", "kill -9 serve")]
    assert _schedule(4)[3] == ()


def test_the_report_fails_a_campaign_that_lost_a_request_or_data():
    def level(lost: int = 0, held: bool = True, ok: bool = True) -> Level:
        lv = Level(clients=4, seconds=10, requests=40, per_s=4.0, p50=200, p95=400, p99=900,
                   errors=3, lost=lost, held=held)
        lv.faults = [Fault("add", "SYN0_0004", 4, 1.0, 5.0, "generation 1 -> 2", ok)]
        return lv

    text, passed = report([level()], [])
    assert passed and "load held" in text and "requests lost" in text
    assert not report([level(lost=1)], [])[1]
    assert not report([level()], ["SYN0_0004 missing from the served"])[1]
    assert not report([level(held=False)], [])[1]
    assert not report([level(ok=False)], [])[1]
