"""``meterlink demo``, the README's main job: every step verified, and the verification can fail."""

from __future__ import annotations

import json

from click.testing import CliRunner

from simulator import demo as demo_module

OPERATIONS = {
    "19 top-ups",
    "top-up submitted twice, reply lost once",
    "remote customer in arrears",
    "tariff change",
    "meter out of credit",
    "top-up restores supply",
    "remote customer pays",
    "trip at night",
    "meter that does not answer",
}


def test_demo_json_runs_the_day_and_finds_no_mismatch():
    result = CliRunner().invoke(demo_module.demo, ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mismatches"] == 0 and report["verified"] is True, report
    assert {o["operation"] for o in report["outcomes"]} == OPERATIONS
    assert all(o["ok"] for o in report["outcomes"]), report["outcomes"]
    assert report["commands"]["confirmed"] >= 45 and report["commands"]["refused"] == 1
    assert "[07:00]" in result.stderr  # progress goes to stderr with --json


def test_a_top_up_the_ledger_does_not_know_is_a_mismatch(monkeypatch):
    """Money that reached a meter outside the gateway is found by the verification."""
    original = demo_module.Demo.day

    async def day_with_a_stray_top_up(self):
        await original(self)
        sim = self.fleet.meter("000000000020")
        wallet = sim.meter.wallet
        sim.meter.advance(self.clock.now())
        assert wallet.top_up(1234, wallet.count + 1, wallet.customer, False, sim.meter.now_ms)

    monkeypatch.setattr(demo_module.Demo, "day", day_with_a_stray_top_up)
    result = CliRunner().invoke(demo_module.demo, ["--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["mismatches"] >= 1 and report["verified"] is False
    assert any("000000000020" in d for d in report["mismatch_details"]), report["mismatch_details"]
