"""``meterlink sim`` as a subprocess: start-up errors, and reads over ``--pty`` and ``--mqtt``.

* Every start-up error is one ``Error:`` line on stderr and a non-zero exit, never a
  traceback: an admin port in use, a TCP port range past 65535 (``--buses B --tcp HOST:PORT``),
  an unreachable broker (with its reason), an ``--mqtt`` URL that is not mqtt://, and fleet
  options (``--buses``, ``--baud``, ...) given with a scenario file that sets them itself.
* The transports end to end: the simulator prints its pty device paths and MQTT topics, and
  the gateway's own client (:class:`gateway.client.MeterClient` over ``serial://`` or
  ``mqtt://``) reads a meter through them; the admin interface gives the ground truth. MQTT
  runs against the machine's Mosquitto on 127.0.0.1:1883 with a unique topic prefix per test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.client import MeterClient
from gateway.errors import NoReply
from gateway.link import Link, LinkConfig
from gateway.transports import open_transport

METERLINK = Path(sys.executable).with_name("meterlink")
pytestmark = pytest.mark.skipif(not METERLINK.exists(), reason="the meterlink script is not installed in this venv")

ENERGY = 0x00010000  # forward active energy, total (kWh)
MONEY = 0x00900200  # remaining money (yuan)
A3 = "000000000003"
TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_listening() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 1883), timeout=0.5):
        return True
    return False


def run_sim(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``meterlink sim ARGS`` to its end (start-up errors end it at once)."""
    return subprocess.run(
        [str(METERLINK), "sim", *args, "--summary-every", "0"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], pattern: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


# --- start-up errors ---------------------------------------------------------------------------------------


def test_an_admin_port_in_use_is_one_error_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_sim("--meters", "2", "--tcp", "127.0.0.1:0", "--admin", f"127.0.0.1:{port}")
    line = assert_one_error_line(result, rf"admin interface cannot listen on 127\.0\.0\.1:{port}: .*in use")
    assert "SystemExit" not in result.stderr and line.startswith("Error: cannot start the simulator: ")


def test_a_tcp_port_in_use_is_one_error_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_sim("--meters", "2", "--tcp", f"127.0.0.1:{port}")
    assert_one_error_line(result, rf"cannot start the simulator: .*{port}.*in use")


def test_bus_ports_past_65535_name_the_bus_that_does_not_fit() -> None:
    result = run_sim("--meters", "4", "--buses", "3", "--tcp", "127.0.0.1:65534")
    assert result.returncode == 2
    assert_one_error_line(
        result, r"--tcp: bus bus2 would listen on port 65536 \(PORT \+ 2\).*PORT must be at most 65533"
    )
    assert "OverflowError" not in result.stderr


def test_an_unreachable_broker_gives_the_reason() -> None:
    began = time.monotonic()
    result = run_sim("--meters", "2", "--mqtt", f"mqtt://127.0.0.1:{free_port()}/x")
    assert_one_error_line(
        result, r"cannot start the simulator: MQTT broker 127\.0\.0\.1:\d+ not reachable: .*[Rr]efused"
    )
    assert time.monotonic() - began < 8  # reported on the first refusal, not after retrying


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1883/x", "mqtts://127.0.0.1:8883/x", "127.0.0.1:1883/x", "ws://127.0.0.1/x"]
)
def test_an_mqtt_url_of_another_scheme_is_refused(url: str) -> None:
    result = run_sim("--meters", "2", "--mqtt", url)
    assert result.returncode == 2
    assert_one_error_line(result, r"--mqtt: .*the scheme must be mqtt://")


def test_an_mqtt_port_out_of_range_is_refused() -> None:
    assert_one_error_line(run_sim("--meters", "2", "--mqtt", "mqtt://127.0.0.1:70000/x"), r"--mqtt: .*port")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--buses", "3"], "--buses applies"),
        (["--baud", "9600"], "--baud applies"),
        (["--buses", "1", "--mode", "remote"], "--buses, --mode apply"),
        (["--balance", "5.00", "--load", "pv"], "--balance, --load apply"),
        (["--first-address", "000000001001"], "--first-address applies"),
        (["--price", "0.6000"], "--price applies"),
        (["--prices", "0.8,0.6,0.5,0.3"], "--prices applies"),
        (["--fault", "no_reply"], "--fault applies"),
        (["--fault", "no_reply", "--fault", "late_reply:delay_ms=800"], "--fault applies"),
    ],
)
def test_fleet_flags_with_a_scenario_file_are_refused(tmp_path: Path, flags: list[str], named: str) -> None:
    scenario = tmp_path / "fleet.toml"
    scenario.write_text('[[bus]]\nname = "line-1"\nmeters = 2\nbaud = 2400\n', encoding="utf-8")
    result = run_sim(str(scenario), "--tcp", "127.0.0.1:0", *flags)
    assert result.returncode == 2
    assert_one_error_line(result, rf"{re.escape(named)} only to a fleet built with --meters N; a scenario file sets")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--first-address", "12345678901234"], r"first_address: .*12 digits"),
        (["--first-address", "999999999999"], r"first_address: 999999999999 is not a meter address"),
        (["--first-address", "999999999998"], r"first_address: 2 meters from 999999999998 would end at"),
        (["--price", "0.12345"], r"tariff\.prices: price of T1 = 0\.12345 .*4 decimals"),
        (["--price", "cheap"], r"tariff\.prices\[0\]: 'cheap' is not a decimal number"),
        (["--prices", "0.8,0.6,0.5"], r"tariff\.prices: a price set holds 4\.\.12 prices"),
        (["--price", "0.5", "--prices", "0.8,0.6,0.5,0.3"], r"give --price .* or --prices .*, not both"),
        (["--fault", "no_such_fault"], r"faults\[0\]: kind must be one of no_reply, late_reply"),
        (["--fault", "no_reply", "--fault", "bad_checksum:probability=1.5"], r"faults\[1\]\.probability: 1\.5"),
        (["--fault", "late_reply:delay=800"], r"faults\[0\]: unknown setting\(s\) delay \(known: delay_ms"),
        (["--fault", "no_reply:remaining"], r"fault 'no_reply:remaining': give KIND\[:key=value,\.\.\.\]"),
    ],
)
def test_bad_address_tariff_and_fault_flags_are_one_error_line(flags: list[str], message: str) -> None:
    assert_one_error_line(run_sim("--meters", "2", "--tcp", "127.0.0.1:0", *flags), message)


# --- reads through the printed endpoints ----------------------------------------------------------------


class Sim:
    """A running ``meterlink sim``: its endpoint lines and admin URL; killed by :meth:`stop`."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(METERLINK), "sim", *args, "--admin", "127.0.0.1:0", "--summary-every", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.seen: list[str] = []
        self.admin = ""
        deadline = time.monotonic() + TIMEOUT
        while not self.admin:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"meterlink sim printed no admin line in time: {self.seen}") from None
            if line is None:
                raise AssertionError(f"meterlink sim ended: {self.seen} {self.proc.stderr.read()}")  # type: ignore[union-attr]
            self.seen.append(line.rstrip("\n"))
            if line.strip().startswith("admin: "):
                self.admin = line.split("admin: ", 1)[1].strip().replace("/meters/{address}", "")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def advance(self, seconds: int) -> None:
        """Move virtual time (the meters draw energy and money meanwhile)."""
        body = json.dumps({"seconds": seconds}).encode()
        headers = {"content-type": "application/json"}
        req = urllib.request.Request(f"{self.admin}/time/advance", data=body, method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=TIMEOUT):
            pass

    def truth(self, address: str) -> dict[str, str]:
        with urllib.request.urlopen(f"{self.admin}/meters/{address}", timeout=TIMEOUT) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def sim_process() -> Iterator[list[Sim]]:
    """Started simulators, killed at the end of the test whatever happens."""
    started: list[Sim] = []
    try:
        yield started
    finally:
        for s in started:
            s.stop()


async def read_through(url: str, address: str) -> tuple[Decimal, Decimal]:
    """Energy and money of ``address`` with the gateway's own client over the bus URL."""
    link = Link(open_transport(url), LinkConfig(gap_s=0.005))
    await link.start()
    try:
        client = MeterClient(link, address, retries=2)
        energy, money = await client.read_many([ENERGY, MONEY])
    finally:
        await link.stop()
    assert (energy.address, money.address) == (address, address)
    return energy.value, money.value


async def test_a_meter_is_read_through_the_printed_pty_device(sim_process: list[Sim]) -> None:
    sim = Sim("--meters", "6", "--buses", "2", "--pty", "--speed", "0", "--no-timing", "--seed", "5")
    sim_process.append(sim)
    ptys = [re.match(r"\s*pty (\S+) \(bus (\w+), 8N1, no line timing\)", line) for line in sim.seen]
    devices = {m.group(2): m.group(1) for m in ptys if m}
    assert sorted(devices) == ["bus0", "bus1"], sim.seen
    sim.advance(6 * 3600)
    for address in ("000000000001", "000000000006"):
        truth = sim.truth(address)
        assert Decimal(truth["energy_kwh"]) > 0
        device = devices[truth["bus"]]
        assert device.startswith("/dev/")
        energy, money = await read_through(f"serial://{device}?parity=N", address)
        assert (energy, money) == (Decimal(truth["energy_kwh"]), Decimal(truth["remaining_money"]))


@pytest.mark.skipif(not broker_listening(), reason="no MQTT broker listening on 127.0.0.1:1883")
@pytest.mark.parametrize("dtu", [False, True], ids=["per-bus", "dtu"])
async def test_a_meter_is_read_over_mqtt_through_the_real_broker(sim_process: list[Sim], dtu: bool) -> None:
    prefix = f"meterlink-sim-cli-test/{uuid.uuid4().hex}"
    args = ["--meters", "4", "--buses", "2", "--mqtt", f"mqtt://127.0.0.1:1883/{prefix}", "--speed", "0"]
    sim = Sim(*args, "--no-timing", "--seed", "5", *(["--dtu"] if dtu else []))
    sim_process.append(sim)
    mode = "DTU mode, one id per meter" if dtu else "one id per bus"
    assert any(f"mqtt://127.0.0.1:1883 {prefix}/<id>/down -> {prefix}/<id>/up ({mode}" in s for s in sim.seen), sim.seen
    sim.advance(6 * 3600)
    truth = sim.truth(A3)
    assert Decimal(truth["energy_kwh"]) > 0
    ident = A3 if dtu else truth["bus"]
    energy, money = await read_through(f"mqtt://127.0.0.1:1883/{prefix}/{ident}", A3)
    assert (energy, money) == (Decimal(truth["energy_kwh"]), Decimal(truth["remaining_money"]))
    if not dtu:  # a bus id that is not the meter's gets no reply: the topics really are per bus
        other = next(b for b in ("bus0", "bus1") if b != truth["bus"])
        link = Link(open_transport(f"mqtt://127.0.0.1:1883/{prefix}/{other}"), LinkConfig(gap_s=0.005))
        await link.start()
        try:
            with pytest.raises(NoReply):
                await MeterClient(link, A3, retries=0).read(ENERGY)
        finally:
            await link.stop()


PRICES = 0x040501FF  # the current TOU prices T1..T4 (yuan/kWh, 4 decimals)


async def read_over_tcp(port: int, address: str, di: int, retries: int = 0) -> object:
    """One DI of ``address`` with the gateway's own client over the simulator's TCP port."""
    link = Link(open_transport(f"socket://127.0.0.1:{port}"), LinkConfig(gap_s=0.005))
    await link.start()
    try:
        return (await MeterClient(link, address, retries=retries).read(di)).value
    finally:
        await link.stop()


async def test_first_address_and_prices_set_the_fleet_built_with_meters_n(sim_process: list[Sim]) -> None:
    port = free_port()
    args = ["--meters", "3", "--first-address", "000000001001", "--prices", "0.8000,0.6000,0.5000,0.3000"]
    sim = Sim(*args, "--tcp", f"127.0.0.1:{port}", "--speed", "0", "--no-timing")
    sim_process.append(sim)
    assert sim.seen[0].startswith("meterlink sim: 3 meters on 1 bus"), sim.seen
    for address in ("000000001001", "000000001003"):
        assert sim.truth(address)["address"] == address
        prices = await read_over_tcp(port, address, PRICES)
        assert prices == [Decimal("0.8000"), Decimal("0.6000"), Decimal("0.5000"), Decimal("0.3000")]
    with pytest.raises(urllib.error.HTTPError) as missing:
        sim.truth("000000000001")  # the range starts at --first-address
    assert missing.value.code == 404
    with pytest.raises(NoReply):
        await read_over_tcp(port, "000000000001", ENERGY)


async def test_a_flat_price_flag_prices_every_tariff(sim_process: list[Sim]) -> None:
    port = free_port()
    sim = Sim("--meters", "1", "--price", "0.6123", "--tcp", f"127.0.0.1:{port}", "--speed", "0", "--no-timing")
    sim_process.append(sim)
    assert await read_over_tcp(port, "000000000001", PRICES) == [Decimal("0.6123")] * 4


async def test_a_fault_flag_faults_every_meter(sim_process: list[Sim]) -> None:
    port = free_port()
    sim = Sim(
        "--meters", "2", "--fault", "no_reply:remaining=2", "--tcp", f"127.0.0.1:{port}", "--speed", "0", "--no-timing"
    )
    sim_process.append(sim)
    a1, a2 = "000000000001", "000000000002"
    assert sim.truth(a1)["faults"] == sim.truth(a2)["faults"] == ["no_reply"]
    for _ in range(2):  # each meter has its own copy: two silent replies
        with pytest.raises(NoReply):
            await read_over_tcp(port, a1, ENERGY)
    assert await read_over_tcp(port, a1, ENERGY) == Decimal(sim.truth(a1)["energy_kwh"])
    assert sim.truth(a1)["faults"] == [] and sim.truth(a2)["faults"] == ["no_reply"]
    with pytest.raises(NoReply):
        await read_over_tcp(port, a2, ENERGY)
