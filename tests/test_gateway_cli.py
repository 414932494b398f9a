"""``meterlink read | write | relay | discover | time-sync`` against a simulated fleet served on TCP.

The fleet runs in a background thread with its own event loop (the CLI runs ``asyncio.run``
in the test's thread); ``CliRunner`` drives :data:`gateway.cli.cli`, and two tests run the
installed ``meterlink`` console script as a subprocess. Every error must be one line on
stderr with a non-zero exit status and no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from gateway.cli import cli
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import Fleet
from simulator.scenario import build as build_scenario
from simulator.scenario import from_flags
from simulator.transports import TcpEndpoint, serve_tcp

A1, A2, A3 = "000000000001", "000000000002", "000000000003"
FAST = ["--timeout", "0.05", "--retries", "0"]  # for the error cases that wait for silence
METERLINK = Path(sys.executable).parent / "meterlink"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_time() -> datetime:
    """An hour ago (relay validity is "now + N minutes" on the CLI side), away from local midnight."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    local = start + timedelta(hours=8)
    if local.hour * 60 + local.minute < 15 or local.hour * 60 + local.minute > 1425:
        start -= timedelta(minutes=30)  # a time broadcast is refused within 5 minutes of midnight
    return start


class ServedFleet:
    """A fleet (bus0: meters 1 and 2, bus1: meter 3 alone) served on TCP from a background loop."""

    def __init__(self, profile: str | None = None) -> None:
        if profile is None:
            scenario = from_flags(3, 2, timing=False, start=start_time())
        else:
            doc = {
                "fleet": {"start": start_time().isoformat(), "speed": 0},
                "defaults": {"profile": profile},
                "bus": [{"name": "bus0", "meters": 2}, {"name": "bus1", "meters": 1}],
            }
            scenario = build_scenario(doc, timing=False)
        self.fleet = Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet", daemon=True)
        self.thread.start()
        self.endpoints: dict[str, TcpEndpoint] = {
            name: asyncio.run_coroutine_threadsafe(serve_tcp(bus, "127.0.0.1", 0), self.loop).result(5)
            for name, bus in self.fleet.buses.items()
        }

    def url(self, bus: str = "bus0") -> str:
        return f"tcp://127.0.0.1:{self.endpoints[bus].port}"

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the fleet's loop thread (faults, ground truth) and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def state(self, address: str) -> dict[str, Any]:
        return self.call(lambda: self.fleet.state(address))

    def close(self) -> None:
        for endpoint in self.endpoints.values():
            asyncio.run_coroutine_threadsafe(endpoint.aclose(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[ServedFleet]:
    fleet = ServedFleet()
    try:
        yield fleet
    finally:
        fleet.close()


def meterlink(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_ok(result: Result) -> list[str]:
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stderr == ""
    return result.stdout.splitlines()


def assert_error(result: Result, pattern: str, exit_code: int = 1) -> str:
    """One clear ``meterlink: ...`` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meterlink: "), lines
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def assert_usage_error(result: Result, pattern: str) -> str:
    """A bad argument: click's usage hint and one ``Error:`` line, exit 2, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stderr
    return errors[0]


# --- read ------------------------------------------------------------------------------------


def test_read_text(served: ServedFleet):
    for address in (A1, A2):
        lines = assert_ok(meterlink("read", "--bus", served.url(), address, "00010000", "0201-0100", "00900200"))
        truth = served.state(address)
        assert lines[0] == f"00010000  Forward active energy, total: {truth['energy_kwh']} kWh"
        assert re.fullmatch(r"02010100  Voltage, phase A: \d{3}\.\d V", lines[1])
        assert lines[2] == f"00900200  Remaining money: {truth['remaining_money']} yuan"
        assert len(lines) == 3


def test_read_json(served: ServedFleet):
    dis = ["00010000", "02010100", "00900200", "04000401", "0001FF00"]
    lines = assert_ok(meterlink("read", "--bus", served.url(), "--json", "2", *dis))
    rows = [json.loads(line, parse_float=Decimal) for line in lines]
    assert [r["di"] for r in rows] == dis
    for row in rows:
        assert {"address", "di", "value", "unit"} <= row.keys()
        assert row["address"] == A2
    truth = served.state(A2)
    energy, voltage, money, address, block = rows
    assert (energy["value"], energy["unit"]) == (Decimal(truth["energy_kwh"]), "kWh")
    assert voltage["unit"] == "V" and 150 < voltage["value"] < 300
    assert (money["value"], money["unit"]) == (Decimal(truth["remaining_money"]), "yuan")
    assert (address["value"], address["unit"]) == (A2, None)
    assert block["unit"] == "kWh" and len(block["value"]) == 5 and block["value"][0] == energy["value"]


# --- write, relay, discover, time-sync ----------------------------------------------------------


def test_write_with_mac(served: ServedFleet):
    lines = assert_ok(meterlink("write", "--bus", served.url(), "--security", "mac", A1, "04001001", "30.00"))
    assert lines == [f"{A1}: 04001001 written"]
    assert served.call(lambda: served.fleet.meter(A1).meter.wallet.limits.alarm_1) == 3000
    lines = assert_ok(meterlink("read", "--bus", served.url(), A1, "04001001"))
    assert lines == ["04001001  Alarm money limit 1: 30.00 yuan"]


def test_relay_trip_and_direct_close(served: ServedFleet):
    assert served.state(A2)["relay"] == "closed"
    assert assert_ok(meterlink("relay", "--bus", served.url(), A2, "trip")) == [f"{A2}: trip accepted"]
    assert served.state(A2)["relay"] == "open"
    assert assert_ok(meterlink("relay", "--bus", served.url(), A2, "direct-close")) == [f"{A2}: direct-close accepted"]
    assert served.state(A2)["relay"] == "closed"


def test_relay_refused_by_a_meter_whose_clock_is_ahead_says_why(served: ServedFleet):
    """The meter refuses a frame whose validity end lies in its past; the 1-byte reply reports
    "password", so the error line adds what the meter's clock reads (dlt645.md §4.1)."""
    from simulator.faults import Fault, FaultSpec

    served.call(lambda: served.fleet.inject(A2, FaultSpec(Fault.CLOCK_JUMP, seconds=2 * 86_400)))
    line = assert_error(meterlink("relay", "--bus", served.url(), A2, "trip"), rf"meter {A2} refused")
    assert "the meter's clock reads" in line and "past the validity end" in line
    assert served.state(A2)["relay"] == "closed"


def test_discover(served: ServedFleet):
    assert assert_ok(meterlink("discover", "--bus", served.url("bus1"))) == [A3]  # alone: wildcard read-address
    lines = assert_ok(meterlink("discover", "--bus", served.url(), *FAST, "--address", "1", "--address", "7"))
    assert lines == [A1]  # probing a list on a shared line
    # Two meters answering the wildcard collide: an error, never a made-up address.
    line = assert_error(meterlink("discover", "--bus", served.url(), *FAST), r"no reply from meter AAAAAAAAAAAA")
    assert line.endswith("probe them with --address")  # the hint for a shared line
    assert served.fleet.buses["bus0"].stats.collisions == 1


def test_time_sync(served: ServedFleet):
    target = served.call(served.fleet.now) + timedelta(minutes=2)
    lines = assert_ok(meterlink("time-sync", "--bus", served.url(), "--at", target.isoformat()))
    assert lines == [f"time {target.astimezone(METER_TZ).isoformat()} broadcast"]
    for address in (A1, A2):
        state = served.state(address)
        shift = datetime.fromisoformat(state["meter_time"]) - datetime.fromisoformat(state["time"])
        assert shift == timedelta(minutes=2)
    assert served.state(A3)["meter_time"] == served.state(A3)["time"]  # another line
    assert served.fleet.buses["bus0"].stats.broadcasts == 1


# --- errors ---------------------------------------------------------------------------------------


def test_no_reply_from_an_unknown_address(served: ServedFleet):
    assert_error(
        meterlink("read", "--bus", served.url(), *FAST, "000000000009", "00010000"),
        r"no reply from meter 000000000009 to function 0x11 DI 00010000 after 1 attempt",
    )


def test_wrong_address_fault(served: ServedFleet):
    served.call(lambda: served.fleet.inject(A1, FaultSpec(Fault.WRONG_ADDRESS)))
    result = meterlink("read", "--bus", served.url(), *FAST, A1, "00900200")
    line = assert_error(result, rf"reply from meter {A2}, but meter {A1} was asked")
    assert "100.00" not in line
    # --json: the failure is an object naming the DI, on stdout with the values; exit 1
    result = meterlink("read", "--bus", served.url(), *FAST, "--json", A1, "00900200")
    assert result.exit_code == 1 and result.stderr == ""
    row = json.loads(result.stdout)
    assert row == {"address": A1, "di": "00900200", "error": f"reply from meter {A2}, but meter {A1} was asked"}


def test_refused_plaintext_trip(served: ServedFleet):
    # The right level-02 password (the simulator's), yet a plaintext trip is refused: ERR 0x04.
    plaintext = ["--plaintext", "--level", "02", "--password", "123456"]
    line = assert_error(
        meterlink("relay", "--bus", served.url(), *plaintext, A1, "trip"),
        rf"^meterlink: meter {A1} refused function 0x1C: .*password",
    )
    assert line.count("refused") == 1
    assert served.state(A1)["relay"] == "closed"
    # ... while a plaintext close with the same password is accepted
    assert assert_ok(meterlink("relay", "--bus", served.url(), *plaintext, A1, "close-allowed")) == [
        f"{A1}: close-allowed accepted"
    ]


def test_refused_read_of_an_unserved_di(served: ServedFleet):
    line = assert_error(
        meterlink("read", "--bus", served.url(), A1, "00900100"),
        rf"^meterlink: meter {A1} refused function 0x11 DI 00900100: no_data$",
    )
    assert line.count("refused") == 1


def test_read_goes_on_past_a_refused_di(served: ServedFleet):
    truth = served.state(A1)
    result = meterlink("read", "--bus", served.url(), A1, "00010000", "00900100", "00900200")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout.splitlines() == [
        f"00010000  Forward active energy, total: {truth['energy_kwh']} kWh",
        f"00900200  Remaining money: {truth['remaining_money']} yuan",
    ]
    assert result.stderr.splitlines() == [f"meterlink: meter {A1} refused function 0x11 DI 00900100: no_data"]

    result = meterlink("read", "--bus", served.url(), "--json", A1, "00010000", "00900100", "00900200")
    assert result.exit_code == 1 and result.stderr == ""
    rows = [json.loads(line, parse_float=Decimal) for line in result.stdout.splitlines()]
    assert [r["di"] for r in rows] == ["00010000", "00900100", "00900200"]
    assert rows[0]["value"] == Decimal(truth["energy_kwh"]) and "error" not in rows[0]
    assert rows[1] == {
        "address": A1,
        "di": "00900100",
        "error": f"meter {A1} refused function 0x11 DI 00900100: no_data",
    }
    assert rows[2]["value"] == Decimal(truth["remaining_money"])


def test_read_of_an_absent_meter_does_not_wait_out_every_di(served: ServedFleet):
    result = meterlink("read", "--bus", served.url(), *FAST, "000000000009", "00010000", "00900200", "02010100")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [  # one line, not one per DI
        "meterlink: no reply from meter 000000000009 to function 0x11 DI 00010000 after 1 attempt(s)",
    ]
    assert served.fleet.buses["bus0"].stats.requests == 1  # only the first DI went out
    # --json: still one object per DI
    result = meterlink("read", "--bus", served.url(), *FAST, "--json", "000000000009", "00010000", "00900200")
    assert result.exit_code == 1 and result.stderr == ""
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["di"] for r in rows] == ["00010000", "00900200"] and all("error" in r for r in rows)


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("http://127.0.0.1:1", r"unknown scheme 'http'"),
        ("tcp://127.0.0.1", r"missing port"),
        ("serial://ttyUSB0", r"absolute path"),
        ("mqtt://127.0.0.1:1883", r"missing topic"),
    ],
)
def test_bad_bus_url(url: str, pattern: str):
    assert_error(meterlink("read", "--bus", url, A1, "00010000"), pattern)


def test_unreachable_converter():
    url = f"tcp://127.0.0.1:{free_port()}"
    assert_error(meterlink("read", "--bus", url, *FAST, A1, "00010000"), r"cannot connect: .*refused")


@pytest.mark.parametrize("di", ["0001000G", "000100", "0x00010000", "000100000"])
def test_bad_di(di: str):
    assert_usage_error(meterlink("read", "--bus", "tcp://127.0.0.1:1", A1, di), r"Invalid value for DI")


@pytest.mark.parametrize("address", ["00000000000X", "0000000000001", "12.34", "999999999999"])
def test_bad_address(address: str):
    assert_usage_error(
        meterlink("read", "--bus", "tcp://127.0.0.1:1", address, "00010000"), r"Invalid value for ADDRESS"
    )


def test_write_to_the_broadcast_address_is_refused_not_reported_written(served: ServedFleet):
    # Nobody answers 99..99: this used to print "999999999999: 04001001 written" and exit 0.
    result = meterlink("write", "--bus", served.url(), "999999999999", "04001001", "1")
    assert_usage_error(result, r"Invalid value for ADDRESS: 999999999999 is the broadcast address")
    assert served.fleet.buses["bus0"].stats.requests == 0


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["write", A1, "04001001", "abc"], r"Invalid value for VALUE"),
        (["write", A1, "12345678", "1"], r"unknown data identifier 12345678"),
        (["write", "--level", "zz", A1, "04001001", "1"], r"Invalid value for --level"),
        (["relay", "--plaintext", "--level", "zz", A1, "direct-close"], r"Invalid value for --level"),
        (["relay", A1, "explode"], r"'explode' is not one of"),
        (["time-sync", "--at", "yesterday"], r"Invalid value for --at"),
    ],
)
def test_bad_arguments(args: list[str], pattern: str):
    command, *rest = args
    assert_usage_error(meterlink(command, "--bus", "tcp://127.0.0.1:1", *rest), pattern)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["write", "--password", "xyz", A1, "04001001", "1"], r"password 'xyz' is not 6 digits"),
        (["time-sync", "--at", "1990-01-01T00:00:00"], r"year 1990 is outside"),
    ],
)
def test_bad_values_found_while_building_the_frame(served: ServedFleet, args: list[str], pattern: str):
    command, *rest = args
    assert_error(meterlink(command, "--bus", served.url(), *rest), pattern)
    assert served.fleet.buses["bus0"].stats.requests == 0


def test_a_value_that_does_not_fit_its_di_is_a_usage_error_and_nothing_is_sent(served: ServedFleet):
    assert_usage_error(meterlink("write", "--bus", served.url(), A1, "04001001", "1e9"), r"does not fit XXXXXX\.XX")
    assert served.fleet.buses["bus0"].stats.requests == 0


def test_write_takes_a_time_of_day_for_a_time_di(served: ServedFleet):
    """The same value parser as ``encode write``: 04000102 (hhmmss) takes 12:00:00."""
    result = meterlink("write", "--bus", served.url(), "--level", "02", A1, "04000102", "12:00:00")
    assert result.exit_code != 2 and "Error: Invalid value" not in result.output, result.output
    assert served.fleet.buses["bus0"].stats.requests >= 1  # parsed, encoded and sent


@pytest.mark.parametrize(
    ("operator", "pattern"),
    [
        ("123", r"operator code '123' has 3 digits: give 8 hex digits"),
        ("123456789", r"has 9 digits"),
        ("XYZ", r"operator code 'XYZ' is not hex"),
        ("0000000G", r"is not hex"),
    ],
)
def test_bad_operator_is_a_usage_error(served: ServedFleet, operator: str, pattern: str):
    assert_usage_error(meterlink("relay", "--bus", served.url(), "--operator", operator, A1, "trip"), pattern)
    assert_usage_error(meterlink("read", "--bus", served.url(), "--operator", operator, A1, "00010000"), pattern)
    assert served.fleet.buses["bus0"].stats.requests == 0


def test_unreachable_mqtt_broker_is_reported_at_once():
    began = time.monotonic()
    url = f"mqtt://127.0.0.1:{free_port()}/meterlink-test/x"
    assert_error(meterlink("read", "--bus", url, A1, "00010000"), r"broker not reachable: .*[Rr]efused")
    assert time.monotonic() - began < 2.0  # was ~41 s: 3 attempts x a fixed 10 s open timeout


MOSQUITTO = "/usr/sbin/mosquitto"


class PrivateMosquitto:
    """A broker process of our own on a free port, to kill and restart (never the machine's)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            assert self.proc.poll() is None, "mosquitto exited"
            assert time.monotonic() < deadline, "mosquitto did not start listening"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason=f"{MOSQUITTO} is not installed")
@pytest.mark.skipif(not METERLINK.exists(), reason="the meterlink console script is not installed")
def test_read_of_16_dis_survives_a_broker_restart(served: ServedFleet, tmp_path: Path):
    from simulator.bus import LineTiming
    from simulator.transports import start_mqtt_bridge

    broker = PrivateMosquitto(tmp_path)
    broker.start()
    prefix = f"meterlink-cli-test/{uuid.uuid4().hex[:12]}"
    bus = served.fleet.buses["bus0"]
    # ~0.35 s a read (2400 bps, Td 150 ms): the 16 reads take long enough to kill the broker midway
    served.call(lambda: setattr(bus, "timing", LineTiming(td_distribution="fixed", td_fixed_ms=150)))
    bridge = asyncio.run_coroutine_threadsafe(
        start_mqtt_bridge(
            {"bus0": bus}, f"mqtt://127.0.0.1:{broker.port}", None, prefix, backoff_initial=0.05, backoff_max=0.2
        ),
        served.loop,
    ).result(10)
    dis = ["00010000", "00900200", "04000401", "02010100"] * 4
    cli = subprocess.Popen(
        [str(METERLINK), "read", "--bus", f"mqtt://127.0.0.1:{broker.port}/{prefix}/bus0", A1, *dis],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    started = time.monotonic()
    watchdog = threading.Timer(60, cli.kill)  # never hang the suite
    watchdog.start()
    lines: list[str] = []
    assert cli.stdout is not None and cli.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in cli.stdout), daemon=True)
    reader.start()
    try:
        # Kill the broker once 3 values are out (they are printed as they are read), and in any
        # case before all 16 reads (~6 s) could be done.
        while len(lines) < 3 and time.monotonic() - started < 4.0:
            time.sleep(0.01)
        broker.kill()
        killed = time.monotonic()
        printed = len(lines)
        time.sleep(1.5)
        broker.start()  # same port
        errors = cli.stderr.read()
        cli.wait(30)
        reader.join(5)
        took = time.monotonic() - killed
    finally:
        watchdog.cancel()
        if cli.poll() is None:
            cli.kill()
        asyncio.run_coroutine_threadsafe(bridge.aclose(), served.loop).result(10)
        broker.kill()
    assert printed < 16  # the broker went down mid-sequence
    assert cli.returncode == 0, (errors, lines)
    # no error, no traceback (a warning that the broker connection was lost may be logged)
    assert "meterlink:" not in errors and "Traceback" not in errors, errors
    assert len(lines) == 16 and [line.split()[0] for line in lines] == dis
    assert lines[2] == f"04000401  Communication address: {A1}" == lines[14]
    assert took > 1.5  # the outage was waited out, not skipped


def test_discover_with_addresses_reports_a_dead_line():
    url = f"tcp://127.0.0.1:{free_port()}"
    assert_error(meterlink("discover", "--bus", url, *FAST, "--address", "1"), r"cannot connect: .*refused")


def test_discover_skips_a_silent_meter(served: ServedFleet):
    served.call(lambda: served.fleet.inject(A2, FaultSpec(Fault.NO_REPLY)))
    lines = assert_ok(meterlink("discover", "--bus", served.url(), *FAST, "--address", "1", "--address", "2"))
    assert lines == [A1]


def test_discover_on_a_dead_line_is_the_link_error():
    line = assert_error(
        meterlink("discover", "--bus", "tcp://127.0.0.1:1", *FAST), r"cannot connect"
    )  # a dead line is the link error, not the hint
    assert "--address" not in line


async def _dial_in(gateway_port: int, line_port: int, registration: bytes) -> None:
    """A 4G DTU: keeps dialling the gateway until it listens, then relays to the line (the fleet's TCP)."""
    while True:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", gateway_port)
            break
        except OSError:
            await asyncio.sleep(0.02)
    up_writer.write(registration)
    line_reader, line_writer = await asyncio.open_connection("127.0.0.1", line_port)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(4096):
                writer.write(data)
        writer.close()

    await asyncio.gather(pipe(up_reader, line_writer), pipe(line_reader, up_writer))


@pytest.mark.parametrize(("ident", "registration"), [(A3, b""), ("DTU0042", b"REG:DTU0042\r\n")])
def test_read_through_a_dtu_that_dials_in(served: ServedFleet, ident: str, registration: bytes):
    port = free_port()
    line_port = served.endpoints["bus1"].port  # meter 3 alone: identifiable by its address
    dialler = asyncio.run_coroutine_threadsafe(_dial_in(port, line_port, registration), served.loop)
    try:
        option = "&registration=REG:" if registration else ""
        url = f"dtu://127.0.0.1:{port}/{ident}?wait=5{option}"
        lines = assert_ok(meterlink("read", "--bus", url, A3, "04000401"))
        assert lines == [f"04000401  Communication address: {A3}"]
    finally:
        dialler.cancel()


def test_dtu_that_never_dials_in():
    url = f"dtu://127.0.0.1:{free_port()}/DTU9?registration=REG:&wait=0.2"
    assert_error(meterlink("read", "--bus", url, A1, "00010000"), r"DTU DTU9 did not dial in within 0\.2 s")


# --- 1997 meters --------------------------------------------------------------------------------


@pytest.fixture
def served_1997() -> Iterator[ServedFleet]:
    fleet = ServedFleet(profile="dlt645-1997")
    try:
        yield fleet
    finally:
        fleet.close()


def test_discover_and_read_1997_meters(served_1997: ServedFleet):
    served = served_1997
    p97 = ["--profile", "dlt645-1997"]
    # alone: no 0x13 in 1997; a wildcard read of C032 (these meters echo AA..AA: the number is used)
    assert assert_ok(meterlink("discover", "--bus", served.url("bus1"), *p97)) == [A3]
    lines = assert_ok(meterlink("discover", "--bus", served.url(), *p97, *FAST, "--address", "1", "--address", "7"))
    assert lines == [A1]
    line = assert_error(meterlink("discover", "--bus", served.url(), *p97, *FAST), r"no reply from meter AAAAAAAAAAAA")
    assert "--address" in line  # two meters collide on the wildcard: say how to probe them
    assert all(r.request.function == 0x01 for r in served.call(lambda: list(served.fleet.buses["bus0"].history)))
    result = meterlink("read", "--bus", served.url(), *p97, *FAST, A1, "9010", "1234")
    assert result.exit_code == 1
    assert result.stdout.startswith("9010  Forward active energy, total: ")
    assert result.stderr == f"meterlink: meter {A1} refused function 0x01 DI 1234: di_error\n"


# --- the installed console script -----------------------------------------------------------------


@pytest.mark.skipif(not METERLINK.exists(), reason="the meterlink console script is not installed")
def test_console_script(served: ServedFleet):
    ok = subprocess.run(
        [str(METERLINK), "read", "--bus", served.url(), "--json", A2, "00900200"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert ok.returncode == 0, ok.stderr
    row = json.loads(ok.stdout, parse_float=Decimal)
    assert (row["address"], row["di"], row["value"], row["unit"]) == (A2, "00900200", Decimal("100.00"), "yuan")

    failed = subprocess.run(
        [str(METERLINK), "read", "--bus", served.url(), *FAST, "000000000009", "00010000"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert failed.returncode == 1 and failed.stdout == ""
    assert "Traceback" not in failed.stderr
    assert failed.stderr.splitlines() == [
        "meterlink: no reply from meter 000000000009 to function 0x11 DI 00010000 after 1 attempt(s)"
    ]


# --- user mistakes the codec or the ESAM finds: one line, nothing sent ----------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["relay", "0000000000AA", "trip"],
        ["write", "--security", "cipher", "AAAAAAAAAAAA", "04000102", "03:20:00"],
        ["write", "--security", "mac", "AAAAAAAAAAAA", "04001001", "30.00"],
    ],
)
def test_security_operations_need_a_decimal_meter_number(served: ServedFleet, args: list[str]):
    command, *rest = args
    line = assert_error(meterlink(command, "--bus", served.url(), *rest), r"is not a meter number of 12 decimal digits")
    assert "nothing was sent" in line
    assert served.fleet.buses["bus0"].stats.requests == 0  # refused before anything went out


def test_the_client_refuses_a_top_up_for_a_non_decimal_address():
    from gateway.client import MeterClient, NotAMeterNumber
    from gateway.errors import GatewayError

    client = MeterClient(None, "0000000000AA")  # type: ignore[arg-type]  # never reaches the line
    with pytest.raises(NotAMeterNumber, match="0000000000AA") as caught:
        asyncio.run(client.top_up(1000, 2, "000000000001"))
    assert isinstance(caught.value, GatewayError)


def test_a_time_sync_far_out_of_range_is_a_usage_error(served: ServedFleet):
    result = meterlink("time-sync", "--bus", served.url(), "--at", "9999-12-31T23:59:59+00:00")
    assert_usage_error(result, r"Invalid value for --at: .* is out of range")
    assert served.fleet.buses["bus0"].stats.requests == 0


@pytest.mark.parametrize("error", [ValueError("year 12345 is out of range"), OverflowError("date value out of range")])
def test_any_value_error_on_the_way_is_one_line(served: ServedFleet, monkeypatch: pytest.MonkeyPatch, error: Exception):
    from gateway.client import MeterClient

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(MeterClient, "read_each", broken)
    assert_error(meterlink("read", "--bus", served.url(), A1, "00010000"), re.escape(str(error)))


@pytest.mark.parametrize(
    ("profile", "di", "shown"), [("sgcc-2013", "04000105", "04000105"), ("dlt645-1997", "0123", "0123")]
)
def test_an_unknown_di_to_write_is_named_with_all_its_digits(profile: str, di: str, shown: str):
    result = meterlink("write", "--bus", "tcp://127.0.0.1:1", "--profile", profile, A1, di, "1")
    assert_usage_error(result, rf"unknown data identifier {shown}$")


# --- read --json: an object per DI; the address of the meter that answered --------------------------------


def test_read_json_on_a_line_that_cannot_be_opened_still_gives_every_di_its_object():
    url = f"tcp://127.0.0.1:{free_port()}"
    result = meterlink("read", "--bus", url, "--json", A1, "00010000", "00900200")
    assert result.exit_code == 1 and result.stderr == "", result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["address"], r["di"]) for r in rows] == [(A1, "00010000"), (A1, "00900200")]
    assert all(re.search(r"cannot connect: .*refused", r["error"]) for r in rows), rows
    bad_url = meterlink("read", "--bus", "tcp://127.0.0.1", "--json", A1, "00010000")
    assert bad_url.exit_code == 1 and "missing port" in json.loads(bad_url.stdout)["error"]


def test_read_json_through_the_wildcard_reports_the_meter_that_answered(served: ServedFleet):
    result = meterlink("read", "--bus", served.url("bus1"), "--json", "AAAAAAAAAAAA", "00900200", "00900100")
    assert result.exit_code == 1 and result.stderr == "", result.output  # 00900100: no_data
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["address"], r["di"]) for r in rows] == [(A3, "00900200"), (A3, "00900100")]
    assert "error" not in rows[0] and rows[1]["error"].startswith(f"meter {A3} refused")


# --- the link's log: quiet unless -v (CliRunner hides log output: these run the console script) ---------


def run_script(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(METERLINK), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not METERLINK.exists(), reason="the meterlink console script is not installed")
def test_the_links_warnings_are_printed_only_with_verbose(served: ServedFleet):
    served.call(lambda: served.fleet.inject(A1, FaultSpec(Fault.WRONG_ADDRESS)))
    error = f"reply from meter {A2}, but meter {A1} was asked"
    args = ["read", "--bus", served.url(), "--timeout", "0.05", "--retries", "2", A1, "00900200"]
    quiet = run_script(*args)
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert quiet.stderr.splitlines() == [f"meterlink: DI 00900200: {error}"]  # the error line only
    as_json = run_script(*args, "--json")
    assert as_json.returncode == 1 and as_json.stderr == ""
    assert json.loads(as_json.stdout)["error"] == error
    loud = run_script(*args, "-v")
    assert loud.returncode == 1 and "Traceback" not in loud.stderr
    *warnings, last = loud.stderr.splitlines()
    assert last == f"meterlink: DI 00900200: {error}"
    rejected = f"warning: line {served.url()}: reply from meter {A2} while waiting for {A1}: rejected"
    assert warnings == [rejected] * 3  # one clean line per attempt


class DroppingPeer:
    """Accepts TCP connections and closes them at once (a port that is not a meter line)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                self.accepted += 1
                conn.close()

    def close(self) -> None:
        self.server.close()


@pytest.mark.skipif(not METERLINK.exists(), reason="the meterlink console script is not installed")
def test_a_peer_that_drops_the_connection_fails_in_seconds():
    peer = DroppingPeer()
    try:
        began = time.monotonic()
        result = run_script("read", "--bus", f"tcp://127.0.0.1:{peer.port}", "--retries", "0", A1, "00010000")
        took = time.monotonic() - began
        assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
        (line,) = result.stderr.splitlines()  # no "line ... is down" warning either
        assert line.startswith("meterlink: ") and re.search(r"connection (lost|closed)|down", line), line
        assert took < 10, took  # was ~30 s (the gateway's reconnect_s)
        began = time.monotonic()
        once = meterlink("read", "--bus", f"tcp://127.0.0.1:{peer.port}", "--reconnect", "0", A1, "00010000")
        assert time.monotonic() - began < 3
        assert_error(once, r"^meterlink: ")
    finally:
        peer.close()


def test_a_relay_command_on_the_bus_is_valid_as_long_as_the_gateways_by_default(
    served: ServedFleet, monkeypatch: pytest.MonkeyPatch
):
    from gateway.client import MeterClient
    from gateway.service import DEFAULT_VALIDITY

    ends: list[datetime] = []
    relay = MeterClient.relay

    async def spy(self: MeterClient, command: Any, valid_until: datetime | None = None, **kw: Any) -> Any:
        ends.append(valid_until)  # type: ignore[arg-type]
        return await relay(self, command, valid_until, **kw)

    monkeypatch.setattr(MeterClient, "relay", spy)
    before = datetime.now(UTC)
    assert_ok(meterlink("relay", "--bus", served.url(), A2, "trip"))
    assert_ok(meterlink("relay", "--bus", served.url(), A2, "direct-close", "--valid-minutes", "3"))
    assert abs((ends[0] - before) - DEFAULT_VALIDITY) < timedelta(seconds=5)  # 30 min, as the gateway's
    assert abs((ends[1] - before) - timedelta(minutes=3)) < timedelta(seconds=5)
