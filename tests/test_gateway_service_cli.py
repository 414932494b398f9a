"""``meterlink gateway`` and the commands that talk to it, as an operator runs them; and its configuration file.

* The configuration (gateway/config.py): a full valid file, and every error names the key at
  fault.
* ``meterlink gateway --config FILE`` as a subprocess against ``meterlink sim`` as a
  subprocess (TCP, ``--speed 0``, ``--no-timing``, the admin interface as ground truth):
  ``topup`` (once, and repeated with its idempotency key), ``tariff``, ``relay`` through the
  gateway, ``commands``; bad input is one line on stderr with a non-zero status and no
  traceback; SIGINT stops the gateway cleanly.
* A line that goes away in the middle of a batch of top-ups and comes back: a pty at parity N
  (``serial://``, as a USB RS-485 adapter is replugged: the gateway's device path is a symlink
  that udev would repoint) and a TCP converter that drops its connections. Commands in flight
  end confirmed (retried as needed) and none is applied twice (the simulator's ground truth).

The CLI clients mostly run in-process (``CliRunner``); the console script runs as a subprocess
where the exit path matters (a refused top-up, an unreachable gateway).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from click.testing import CliRunner, Result

from gateway.cli import cli
from gateway.config import ConfigError, build, load
from gateway.holidays import CN_PUBLIC_HOLIDAYS
from gateway.policy import Policy
from protocols.dlt645 import PROFILES, parse_payload
from protocols.dlt645.security import SecurityDI, SecurityRequest
from simulator.bus import LineTiming
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec
from simulator.transports.pty import open_pty_bus
from simulator.transports.tcp import serve_tcp

METERLINK = Path(sys.executable).parent / "meterlink"
KEY = "ops-key-0123456789"
A1, A2, A3, A4 = (f"{n:012d}" for n in range(1, 5))
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("METERLINK_")}
T = TypeVar("T")

pytestmark = pytest.mark.skipif(not METERLINK.exists(), reason="the meterlink console script is not installed")


# --- the configuration file --------------------------------------------------------------------------------

FULL = """
[store]
sqlite = "{tmp}/ledger.sqlite"

[api]
listen = "0.0.0.0:8081"
keys = {{ ops = "ops-key-0123456789", auditor = "auditor-key-1234" }}
read_requires_key = true

[mqtt]
url = "mqtt://127.0.0.1:1883/meterlink/gw"

[policy]
quiet_start = "22:00"
quiet_end = "06:30"
weekend_quiet = false
holidays = ["2026-10-01", "2026-10-02"]
grace_hours = 12
dry_run = true
require_notice = true

[service]
max_attempts = 7
retry_delay_s = 2.5
rate_per_s = 20
concurrency = 16
lease_s = 90
operator = "00000042"

[billing]
prices = ["0.6", "0.5", "0.5", "0.3"]
run_at = "01:15"

[groups]
feeder-7 = ["1", "000000000002"]

[[bus]]
name = "line-1"
url = "tcp://127.0.0.1:7000"
gap_ms = 20
td_max_ms = 300
retries = 3
meters = {{ from = 1, to = 3 }}

[[bus]]
name = "line-2"
url = "serial:///dev/ttyUSB0?baud=2400&parity=E"
profile = "fw-b"
meters = ["000000000010", "11"]

[[meter]]
address = "000000000002"
mode = "remote"
power_hold = true
residential = false
customer = "C-0002"
meter_number = "MN-0002"

[[meter]]
address = "000000000012"
bus = "line-2"
profile = "sgcc-2013"
"""


def test_a_full_configuration(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_text(FULL.format(tmp=tmp_path))
    config = load(path)
    assert config.sqlite == f"{tmp_path}/ledger.sqlite" and config.postgres is None
    assert config.api_listen == ("0.0.0.0", 8081)
    assert config.api_keys == {"ops": KEY, "auditor": "auditor-key-1234"} and config.read_requires_key
    assert config.mqtt_url == "mqtt://127.0.0.1:1883/meterlink/gw"
    p = config.policy
    assert (p.quiet_start.isoformat(), p.quiet_end.isoformat(), p.weekend_quiet) == ("22:00:00", "06:30:00", False)
    assert {"2026-10-01", "2026-10-02"} <= {d.isoformat() for d in p.holidays}
    assert date(2026, 2, 17) in p.holidays  # and the default calendar (gateway/holidays.py)
    assert (p.grace.total_seconds(), p.dry_run, p.require_notice) == (12 * 3600, True, True)
    s = config.service
    assert (s.max_attempts, s.retry_delay.total_seconds(), s.rate_per_s) == (7, 2.5, 20)
    assert (s.concurrency, s.lease.total_seconds(), s.operator) == (16, 90, "00000042")
    assert [str(x) for x in config.billing_prices] == ["0.6", "0.5", "0.5", "0.3"]
    assert config.billing_at.isoformat() == "01:15:00"
    assert config.groups == {"feeder-7": [A1, A2]}
    line1, line2 = config.buses
    assert (line1.name, line1.url) == ("line-1", "tcp://127.0.0.1:7000")
    assert (line1.link.gap_s, line1.link.td_max_s, line1.link.retries) == (0.02, 0.3, 3)
    assert (line2.link.gap_s, line2.link.td_max_s, line2.link.retries) == (0.05, 0.5, 2)  # defaults
    assert sorted(config.meters) == [A1, A2, A3, "000000000010", "000000000011", "000000000012"]
    m2 = config.meters[A2]
    assert (m2.bus, m2.mode, m2.power_hold, m2.residential) == ("line-1", "remote", True, False)
    assert (m2.customer_number, m2.meter_number) == ("C-0002", "MN-0002")
    assert config.meters["000000000010"].profile is PROFILES["fw-b"]
    assert (config.meters["000000000012"].bus, config.meters["000000000012"].profile) == (
        "line-2",
        PROFILES["sgcc-2013"],
    )
    assert config.meters[A1].mode == "local" and not config.meters[A1].power_hold


def test_an_empty_configuration_has_the_documented_defaults():
    config = build({})
    assert (config.sqlite, config.api_listen, config.api_keys, config.buses) == (
        "meterlink.sqlite",
        ("127.0.0.1", 8080),
        {},
        [],
    )
    assert config.policy == Policy(holidays=CN_PUBLIC_HOLIDAYS)  # the default calendar (gateway/holidays.py)


NO_LINE_9 = r"^\[\[meter\]\] 1\.bus: no bus named 'line-9'$"
BUS = {"name": "line-1", "url": "tcp://127.0.0.1:7000", "meters": {"from": 1, "to": 2}}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"stores": {}}, r"^top level: unknown key\(s\) stores$"),
        ({"api": {"port": 8080}}, r"^\[api\]: unknown key\(s\) port$"),
        ({"policy": {"quiet": "22:00"}}, r"^\[policy\]: unknown key\(s\) quiet$"),
        ({"service": {"retry_delay": 5}}, r"^\[service\]: unknown key\(s\) retry_delay$"),
        ({"store": {"path": "x"}}, r"^\[store\]: unknown key\(s\) path$"),
        ({"bus": [{**BUS, "speed": 2400}]}, r"^\[\[bus\]\] 1: unknown key\(s\) speed$"),
        ({"bus": [BUS], "meter": [{"address": "1", "hold": True}]}, r"^\[\[meter\]\] 1: unknown key\(s\) hold$"),
        ({"billing": {"price": []}}, r"^\[billing\]: unknown key\(s\) price$"),
        ({"api": {"listen": "localhost"}}, r"^\[api\]\.listen: 'localhost' is not HOST:PORT"),
        ({"api": {"listen": "127.0.0.1:http"}}, r"^\[api\]\.listen: .* is not HOST:PORT"),
        ({"api": {"listen": "127.0.0.1:70000"}}, r"^\[api\]\.listen: .* is not HOST:PORT \(port 0\.\.65535\)"),
        ({"policy": {"quiet_start": "25:00"}}, r"^\[policy\]\.quiet_start: '25:00' is not HH:MM$"),
        ({"policy": {"quiet_end": "9am"}}, r"^\[policy\]\.quiet_end: '9am' is not HH:MM$"),
        ({"billing": {"run_at": "noon"}}, r"^\[billing\]\.run_at: 'noon' is not HH:MM$"),
        ({"policy": {"holidays": ["2026-13-01"]}}, r"^\[policy\]\.holidays: "),
        ({"policy": {"grace_hours": "two days"}}, r"^\[policy\]\.grace_hours: 'two days' is not a number$"),
        ({"policy": {"weekend_quiet": "no"}}, r"^\[policy\]\.weekend_quiet: 'no' is not true or false$"),
        ({"service": {"max_attempts": "many"}}, r"^\[service\]\.max_attempts: 'many' is not an integer$"),
        ({"service": {"retry_delay_s": -1}}, r"^\[service\]\.retry_delay_s: -1 must not be negative$"),
        ({"bus": [{**BUS, "gap_ms": "fast"}]}, r"^\[\[bus\]\] 1\.gap_ms: 'fast' is not a number$"),
        ({"api": {"keys": {"ops": "short"}}}, r"^\[api\]\.keys: .*at least 8 characters"),
        ({"api": {"keys": ["0123456789", "1234567"]}}, r"^\[api\]\.keys: .*at least 8 characters"),
        ({"api": {"keys": "0123456789"}}, r"^\[api\]\.keys: "),
        (
            {"bus": [BUS, {"name": "line-2", "url": "tcp://127.0.0.1:7001", "meters": ["2"]}]},
            r"^\[\[bus\]\] 2: meter 000000000002 is on two buses$",
        ),
        ({"bus": [BUS, {**BUS, "meters": []}]}, r"^\[\[bus\]\] 2: bus name 'line-1' is used twice$"),
        ({"bus": [{"name": "line-1"}]}, r"^\[\[bus\]\] 1: needs a url$"),
        ({"bus": [{**BUS, "meters": {"from": 1}}]}, r"^\[\[bus\]\] 1\.meters: "),
        ({"bus": [{**BUS, "meters": ["12345678901234"]}]}, r"^\[\[bus\]\] 1\.meters: "),
        ({"bus": [{**BUS, "profile": "acme-2020"}]}, r"^\[\[bus\]\] 1\.profile: unknown profile 'acme-2020'$"),
        (
            {"bus": [BUS], "meter": [{"address": "1", "profile": "acme-2020"}]},
            r"^\[\[meter\]\] 1\.profile: unknown profile 'acme-2020'$",
        ),
        (
            {"bus": [BUS], "meter": [{"address": "9", "bus": "line-9"}]},
            r"^\[\[meter\]\] 1\.bus: no bus named 'line-9'$",
        ),
        (
            {"bus": [BUS], "meter": [{"address": "1", "bus": "line-9"}]},
            r"^\[\[meter\]\] 1\.bus: no bus named 'line-9'$",
        ),
        (
            {
                "bus": [BUS, {**BUS, "name": "line-2", "url": "tcp://127.0.0.1:7001", "meters": []}],
                "meter": [{"address": "1", "bus": "line-2"}],
            },
            r"^\[\[meter\]\] 1\.bus: meter 000000000001 is on bus 'line-1' already",
        ),
        ({"bus": [BUS], "meter": [{"address": "9"}]}, r"^\[\[meter\]\] 1: meter 000000000009 is on no bus"),
        ({"bus": [BUS], "meter": [{"address": "x1"}]}, r"^\[\[meter\]\] 1\.address: "),
        ({"bus": [BUS], "meter": [{"address": "1", "mode": "prepaid"}]}, r"^\[\[meter\]\] 1\.mode: local or remote$"),
        ({"bus": [BUS], "meter": [{"address": "1", "power_hold": 1}]}, r"^\[\[meter\]\] 1\.power_hold: 1 is not true"),
        ({"bus": {"name": "line-1", "url": "tcp://127.0.0.1:7000"}}, r"^\[\[bus\]\]: write each bus as a \[\[bus\]\]"),
        ({"api": "127.0.0.1:8080"}, r"^\[api\]: must be a table"),
        ({"groups": {"feeder": "1"}}, r"^\[groups\]\.feeder: give a list of meter addresses$"),
        ({"groups": {"feeder": ["1", "x"]}}, r"^\[groups\]\.feeder: "),
        ({"billing": {"prices": ["0.5"]}}, r"^\[billing\]\.prices: "),
    ],
)
def test_every_error_names_the_key(doc: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as caught:
        build(doc)
    assert re.search(message, str(caught.value)), str(caught.value)


def test_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.toml"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[api\nlisten = 1")
    with pytest.raises(ConfigError, match=r"bad\.toml: "):
        load(bad)


def test_the_gateway_command_reports_a_bad_configuration_in_one_line(tmp_path: Path):
    path = tmp_path / "gateway.toml"
    path.write_text('[policy]\nquiet_start = "25:00"\n')
    done = subprocess.run(
        [str(METERLINK), "gateway", "--config", str(path)], capture_output=True, text=True, timeout=30, env=CLEAN_ENV
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == ["meterlink: [policy].quiet_start: '25:00' is not HH:MM"]


# --- processes -------------------------------------------------------------------------------------------


class Proc:
    """A ``meterlink`` subprocess whose output lines are collected as they come."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.popen = subprocess.Popen(
            [str(METERLINK), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CLEAN_ENV,
            cwd=cwd,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.lines: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.popen.stdout, self.out.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.popen.stderr, self.err.append), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, put: Callable[[str], None]) -> None:
        for line in stream:
            put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.out.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r}; stdout {self.lines}, stderr {self.err}, exit {self.popen.poll()}"
                ) from None
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m

    def interrupt(self, timeout: float = 15.0) -> int:
        """SIGINT, as Ctrl-C does; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    request.add_header("X-API-Key", KEY)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def gateway_config(
    tmp_path: Path,
    buses: list[tuple[str, str, list[str]]],
    *,
    bus_options: dict[str, Any] | None = None,
    **service: Any,
) -> Path:
    """A configuration with the API on a free port and no quiet hours (quiet_start = quiet_end, no
    weekends), so relay commands are allowed whenever the test runs; ``bus_options`` go in every [[bus]]."""
    lines = [
        "[store]",
        f'sqlite = "{tmp_path}/ledger.sqlite"',
        "[api]",
        'listen = "127.0.0.1:0"',
        f'keys = {{ ops = "{KEY}" }}',
        "[policy]",
        'quiet_start = "00:00"',
        'quiet_end = "00:00"',
        "weekend_quiet = false",
        "[service]",
        *(f"{k} = {v}" for k, v in {"retry_delay_s": 0.2, "max_attempts": 10, **service}.items()),
    ]
    for name, url, meters in buses:
        lines += [
            "[[bus]]",
            f'name = "{name}"',
            f'url = "{url}"',
            "gap_ms = 0",
            "td_max_ms = 100",
            f"meters = {json.dumps(meters)}",
            *(f"{k} = {v}" for k, v in (bus_options or {}).items()),
        ]
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_gateway(config: Path) -> tuple[Proc, str]:
    gateway = Proc("gateway", "--config", str(config))
    gateway.expect(r"^meterlink gateway: \d+ meters on \d+ buses, ledger ")
    url = gateway.expect(r"^  api: (http://127\.0\.0\.1:\d+) \(OpenAPI at http://127\.0\.0\.1:\d+/docs\)$").group(1)
    return gateway, url


# --- the gateway as operators run it --------------------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[tuple[Proc, str, str]]:
    """``meterlink sim`` with 4 meters on one TCP line; (process, bus URL, admin URL)."""
    proc = Proc(
        "sim",
        *("--meters", "4", "--buses", "1", "--tcp", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
        *("--speed", "0", "--no-timing", "--summary-every", "0"),
    )
    try:
        proc.expect(r"^meterlink sim: 4 meters on 1 buses")
        bus = proc.expect(r"^  tcp://127\.0\.0\.1:(\d+) \(bus bus0").group(1)
        admin = proc.expect(r"^  admin: (http://127\.0\.0\.1:\d+)/meters/").group(1)
        yield proc, f"tcp://127.0.0.1:{bus}", admin
    finally:
        proc.interrupt()


def client(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"METERLINK_API_KEY": None, "METERLINK_GATEWAY": None})


def one_error_line(result: Result | subprocess.CompletedProcess[str], pattern: str, code: int = 1) -> None:
    if isinstance(result, Result):
        assert result.exit_code == code, (result.output, result.exception)
        assert isinstance(result.exception, SystemExit), result.exception
        out, err = result.stdout, result.stderr
    else:
        assert result.returncode == code, result
        out, err = result.stdout, result.stderr
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meterlink: "), lines
    assert re.search(pattern, lines[0]), lines[0]


def truth(admin: str, address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{admin}/meters/{address}", timeout=10) as response:
        return json.loads(response.read())


def test_gateway_and_operator_commands(sim: tuple[Proc, str, str], tmp_path: Path):
    _, bus_url, admin = sim
    assert (truth(admin, A1)["remaining_money"], truth(admin, A1)["purchase_count"]) == ("100.00", 1)
    gateway, api = start_gateway(gateway_config(tmp_path, [("line-1", bus_url, [A1, A2, A3, A4])]))
    try:
        key = ("--gateway", api, "--api-key", KEY)

        # A top-up, by the console script: confirmed, the money on the meter once.
        topup = [str(METERLINK), "topup", A1, "50.00", *key, "--key", "order-77"]
        first = subprocess.run(topup, capture_output=True, text=True, timeout=30, env=CLEAN_ENV)
        assert first.returncode == 0 and first.stderr == "", first
        (line,) = first.stdout.splitlines()
        command_id = line.split()[0]
        assert re.fullmatch(
            rf"{command_id}  topup     {A1}  confirmed amount=50\.00, balance_after=150\.00, outcome=applied, "
            r"purchase_count=2",
            line,
        ), line
        assert (truth(admin, A1)["remaining_money"], truth(admin, A1)["purchase_count"]) == ("150.00", 2)

        # Repeated with its idempotency key: the first command, a note on stderr, nothing applied.
        again = client("topup", A1, "50.00", *key, "--idempotency-key", "order-77")
        assert again.exit_code == 0 and again.stdout.splitlines() == [line]
        assert again.stderr.splitlines() == [
            "(this idempotency key was used before: showing the first command, nothing was sent again)"
        ]
        assert (truth(admin, A1)["remaining_money"], truth(admin, A1)["purchase_count"]) == ("150.00", 2)
        as_json = client("topup", A1, "50.00", *key, "--key", "order-77", "--json")
        assert json.loads(as_json.stdout)["id"] == command_id

        # Without a key, the same top-up re-run the same day (after a lost answer) applies once;
        # --new makes a second one on purpose.
        count_before = truth(admin, A4)["purchase_count"]
        derived = client("topup", A4, "7.00", *key)
        assert derived.exit_code == 0 and "confirmed" in derived.stdout, derived.output
        rerun = client("topup", A4, "7", *key)
        assert rerun.exit_code == 0 and rerun.stdout == derived.stdout
        assert "already submitted today" in rerun.stderr and "--new" in rerun.stderr
        second = client("topup", A4, "7.00", *key, "--new")
        assert second.exit_code == 0 and second.stdout.split()[0] != derived.stdout.split()[0]
        assert "purchase_count" in second.stdout
        third = client("topup", A4, "7.00", *key, "--new")  # each --new is another top-up
        assert third.exit_code == 0 and third.stdout.split()[0] not in (
            derived.stdout.split()[0],
            second.stdout.split()[0],
        )
        assert truth(admin, A4)["purchase_count"] == count_before + 3
        # Address forms that would break a URL are quoted, not a traceback.
        one_error_line(client("commands", "a b", "--gateway", api), r"^meterlink: 404: no command")
        listed_odd = client("commands", "--gateway", api, "--address", "a b&state=x")
        assert listed_odd.exit_code != 0 and "Traceback" not in listed_odd.output

        # New prices for meter 2, read back.
        tariff = client("tariff", A2, "0.6800", "0.5800", *key, "--switch-at", "2030-01-01T00:00+08:00")
        assert tariff.exit_code == 0, tariff.output
        assert re.search(
            r"tariff    000000000002  confirmed prices=\['0\.6800', '0\.5800', '0\.5800', '0\.5800'\]", tariff.stdout
        )
        assert "switch_at=2030-01-01T00:00:00+08:00" in tariff.stdout

        # A trip through the gateway (policy, ledger, read-back), not straight to the bus.
        relay = client("relay", A3, "trip", *key)
        assert relay.exit_code == 0, relay.output
        assert re.search(rf"relay     {A3}  confirmed .*relay_open=True", relay.stdout), relay.stdout
        assert truth(admin, A3)["relay"] == "open"
        # Run again: the same command (the CLI sends no validity, the gateway derives the same key).
        relay_again = client("relay", A3, "trip", *key)
        assert relay_again.exit_code == 0 and relay_again.stdout == relay.stdout, relay_again.output
        assert relay_again.stderr.startswith("(the same trip command was already submitted today")

        # The ledger: the list, newest first, and one command with its audit events.
        listed = client("commands", "--gateway", api)
        assert listed.exit_code == 0
        rows = [r.split() for r in listed.stdout.splitlines()]
        assert [(r[1], r[2], r[3]) for r in rows] == [
            ("relay", A3, "confirmed"),
            ("tariff", A2, "confirmed"),
            ("topup", A4, "confirmed"),
            ("topup", A4, "confirmed"),
            ("topup", A4, "confirmed"),
            ("topup", A1, "confirmed"),
        ]
        assert client("commands", "--gateway", api, "--address", "2").stdout.split()[1] == "tariff"
        shown = client("commands", command_id, "--gateway", api)
        assert shown.exit_code == 0
        head, *events = shown.stdout.splitlines()
        assert head == line
        assert [e.split()[1] for e in events] == ["accepted", "sent", "confirmed"]
        assert events[0].split()[2] == "api:ops" and '"purchase_count": 2' in events[1]

        # Bad input: one line on stderr, a non-zero status, no traceback; nothing recorded.
        one_error_line(client("topup", A1, "5.00", "--gateway", api), r"an API key is needed .*--api-key", code=2)
        one_error_line(client("topup", A1, "50.001", *key), r"^meterlink: rejected \(422\): .*amount: .*2 decimals$")
        one_error_line(client("topup", A1, "ten", *key), r"rejected \(422\): .*amount: 'ten' is not a decimal")
        one_error_line(client("topup", "99", "5.00", *key), r"rejected \(422\): meter 000000000099 is not managed")
        one_error_line(
            client("topup", A1, "5.00", "--gateway", api, "--api-key", "wrong-key-0000"), r"rejected \(403\)"
        )
        one_error_line(client("commands", "no-such-command", "--gateway", api), r"^meterlink: 404: no command")
        # A disconnection notice, recorded for the policy's notice rule.
        noted = client("notice", A4, "--text", "SMS: supply will be cut in 7 days", *key)
        assert noted.exit_code == 0 and re.fullmatch(rf"{A4}: notice recorded at \S+ by api:\w+\n", noted.stdout)
        one_error_line(client("notice", "99", *key), r"rejected \(404\): meter 000000000099 is not managed")
        one_error_line(client("notice", A4, "--sent-at", "yesterday", *key), r"rejected \(422\)")
        unreachable = subprocess.run(
            [str(METERLINK), "topup", A1, "5.00", "--gateway", "http://127.0.0.1:1", "--api-key", KEY],
            capture_output=True,
            text=True,
            timeout=30,
            env=CLEAN_ENV,
        )
        one_error_line(unreachable, r"^meterlink: cannot reach the gateway at http://127\.0\.0\.1:1: .*refused")
        assert len(client("commands", "--gateway", api).stdout.splitlines()) == 6
        assert truth(admin, A1)["remaining_money"] == "150.00"
        assert truth(admin, A4)["purchase_count"] == count_before + 3
    finally:
        status = gateway.interrupt()  # SIGINT, as Ctrl-C: a clean stop
    assert status == 0, gateway.err
    gateway.expect(r"^meterlink gateway: stopped$", timeout=5)
    assert gateway.err == [], gateway.err


# --- a line that goes away in the middle of a batch -----------------------------------------------------


class LiveFleet:
    """Six meters on one line with timing on (19200 baud, Td 5 ms), served from a background event loop."""

    METERS: ClassVar[list[str]] = [f"{n:012d}" for n in range(1, 7)]

    def __init__(self) -> None:
        timing = LineTiming(baud=19200, td_min_ms=5, td_max_ms=5, td_distribution="fixed")
        spec = BusSpec("bus0", [MeterSpec(a) for a in self.METERS], timing=timing)
        self.fleet = Fleet([spec], VirtualClock(datetime.now(UTC).replace(microsecond=0), 0), seed=3)
        self.bus = self.fleet.buses["bus0"]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet", daemon=True)
        self.thread.start()
        self.recharges = 0

    def call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return self.run(run())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def state(self, address: str) -> dict[str, Any]:
        return self.call(lambda: self.fleet.state(address))

    def cut_after_recharge(self, n: int, cut: Callable[[], None]) -> threading.Event:
        """Call ``cut`` (in the fleet's loop) right after the meter has applied the ``n``-th recharge, before
        its reply is on the wire: the worst moment for the line to go away."""
        done = threading.Event()
        transact = self.bus.transact

        async def watched(frame: Any, *args: Any, **kw: Any) -> Any:
            chunks = await transact(frame, *args, **kw)
            if frame.function == 0x03 and not done.is_set():
                payload = parse_payload(frame)
                if isinstance(payload, SecurityRequest) and payload.di == SecurityDI.RECHARGE:
                    self.recharges += 1
                    if self.recharges == n:
                        cut()  # the reply is still to be written after its wire time: it never will be
                        done.set()
            return chunks

        self.bus.transact = watched  # type: ignore[method-assign]
        return done

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class PtyLine:
    """The line on a pty; the gateway opens ``link``, a symlink to the current pty (like /dev/serial/by-id/...,
    which udev repoints when a USB RS-485 adapter is plugged in again)."""

    def __init__(self, live: LiveFleet, tmp_path: Path) -> None:
        self.live = live
        self.link = tmp_path / "ttyRS485"
        self.endpoint: Any = None
        self.up()

    @property
    def url(self) -> str:
        return f"serial://{self.link}?baud=19200&parity=N"

    def up(self) -> None:
        self.endpoint = self.live.call(lambda: open_pty_bus(self.live.bus))
        tmp = self.link.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.endpoint.device_path)
        os.replace(tmp, self.link)

    def down(self) -> None:
        """Unplugged: both ends of the pty close (the gateway's reads fail with EIO), the device is gone."""
        self.endpoint.close()

    def close(self) -> None:
        self.live.run(self.endpoint.aclose())


class TcpLine:
    """The line behind a TCP converter that drops every connection and stops listening for a while."""

    def __init__(self, live: LiveFleet, tmp_path: Path) -> None:
        self.live = live
        self.port = 0
        self.endpoint: Any = None
        self.up()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}?baud=19200"

    def up(self) -> None:
        if self.endpoint is not None:
            self.live.run(self.endpoint.aclose())  # every old connection handler has ended
        self.endpoint = self.live.run(serve_tcp(self.live.bus, "127.0.0.1", self.port))
        self.port = self.endpoint.port

    def down(self) -> None:
        self.endpoint.close()

    def close(self) -> None:
        self.live.run(self.endpoint.aclose())


@pytest.mark.parametrize("reconnect_s", [0, 30])
@pytest.mark.parametrize("kind", ["pty", "tcp"])
def test_a_line_that_goes_away_mid_batch_loses_no_top_up_and_applies_none_twice(
    kind: str, reconnect_s: int, tmp_path: Path
):
    """12 top-ups (2 per meter); the line goes away for 0.8 s right after the 4th recharge reached its meter
    (applied, reply lost) and comes back. With ``reconnect_s = 0`` the link gives up at once and the service
    retries (the purchase count says it was applied); by default the link waits for the line and resends
    the recharge, which the meter answers "repeat recharge" (``duplicate``)."""
    live = LiveFleet()
    line: PtyLine | TcpLine = PtyLine(live, tmp_path) if kind == "pty" else TcpLine(live, tmp_path)
    cut = live.cut_after_recharge(4, line.down)
    meters = LiveFleet.METERS
    before = {a: live.state(a) for a in meters}
    config = gateway_config(tmp_path, [("line-1", line.url, meters)], bus_options={"reconnect_s": reconnect_s})
    gateway, api = start_gateway(config)
    try:
        ids = []
        for batch in ("b1", "b2"):
            status, body = http(
                "POST",
                f"{api}/commands/batch",
                {"kind": "topup", "addresses": meters, "params": {"amount": "1.00"}, "idempotency_key": batch},
            )
            assert status == 201, body
            ids += [c["id"] for c in body]

        def commands() -> list[dict[str, Any]]:
            return [http("GET", f"{api}/commands/{i}")[1] for i in ids]

        assert cut.wait(20), "the 4th recharge never came"
        in_flight = [c for c in commands() if c["state"] in ("accepted", "sent")]
        assert len(in_flight) >= 8  # the line went away in the middle of the batch
        time.sleep(0.8)
        line.up()
        end = time.monotonic() + 20
        final = commands()
        while any(c["state"] in ("accepted", "sent") for c in final):
            assert time.monotonic() < end, [c["state"] for c in final]
            time.sleep(0.05)
            final = commands()
        assert [c["state"] for c in final] == ["confirmed"] * 12, final
        if reconnect_s == 0:
            # The top-up whose reply was lost (and any whose read-back met the outage): the meter's purchase
            # count said it was applied; not sent again.
            lost = [c for c in final if c["result"]["outcome"] == "applied before a restart or lost reply"]
            assert len(lost) >= 1, [c["result"] for c in final]
            for c in lost:
                events = http("GET", f"{api}/commands/{c['id']}/events")[1]
                assert [e["state"] for e in events][:2] == ["accepted", "sent"] and events[-1]["state"] == "confirmed"
                assert any("error" in e["detail"] for e in events)  # it met the outage and was retried
        else:
            # The link waited for the line and sent the same recharge again: "repeat recharge", nothing added.
            lost = [c for c in final if c["result"]["outcome"] == "duplicate"]
            assert len(lost) == 1, [c["result"] for c in final]
        for a in meters:  # two top-ups of 1.00 each, each applied exactly once
            after = live.state(a)
            assert after["purchase_count"] == before[a]["purchase_count"] + 2, (a, after)
            assert after["remaining_money"] == "102.00", (a, after)
    finally:
        status = gateway.interrupt()
        line.close()
        live.close()
    assert status == 0 and not any("Traceback" in e for e in gateway.err), gateway.err


# --- user mistakes around the gateway address, and a port in use -------------------------------------------


@pytest.mark.parametrize(
    ("url", "pattern"),
    [
        ("notaurl", r"^meterlink: --gateway 'notaurl' is not usable .*http://HOST:PORT$"),
        ("http://[::1", r"^meterlink: --gateway 'http://\[::1' is not usable \(Invalid IPv6 URL\)"),
        ("ftp://example.org", r"^meterlink: --gateway 'ftp://example.org' is not usable"),
    ],
)
def test_a_bad_gateway_url_is_one_line(url: str, pattern: str):
    done = subprocess.run(
        [str(METERLINK), "topup", A1, "5.00", "--gateway", url, "--api-key", KEY],
        capture_output=True,
        text=True,
        timeout=30,
        env=CLEAN_ENV,
    )
    one_error_line(done, pattern)


def test_a_server_that_is_not_the_gateway_is_one_line():
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.send_error(501)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for args, pattern in (
            (["commands"], r"answered 200 with something that is not JSON: is it a meterlink gateway\?$"),
            (["topup", A1, "5.00", "--api-key", KEY], r"rejected \(501\): .*is .* a meterlink gateway\?$"),
        ):
            done = subprocess.run(
                [str(METERLINK), *args, "--gateway", url], capture_output=True, text=True, timeout=30, env=CLEAN_ENV
            )
            one_error_line(done, pattern)
    finally:
        server.shutdown()


def test_the_gateway_reports_a_port_in_use_in_one_line(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "gateway.toml"
        path.write_text(
            f'[store]\nsqlite = "{tmp_path}/l.sqlite"\n[api]\nlisten = "127.0.0.1:{port}"\nkeys = {{ ops = "{KEY}" }}\n'
        )
        done = subprocess.run(
            [str(METERLINK), "gateway", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=CLEAN_ENV,
        )
    one_error_line(done, rf"^meterlink: cannot start the gateway: the API cannot listen on 127\.0\.0\.1:{port}: ")


def test_mqtt_actors_are_configurable():
    assert build({"mqtt": {"url": "mqtt://127.0.0.1:1883/gw", "actors": ["ops"]}}).mqtt_actors == ("ops",)
    assert build({}).mqtt_actors is None
    with pytest.raises(ConfigError, match=r"^\[mqtt\]\.actors: "):
        build({"mqtt": {"actors": "ops"}})


# --- what the command-submitting CLIs send (the API call replaced) ------------------------------------------


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    from gateway.cli import service as cli_service

    calls: list[dict[str, Any]] = []

    def submit(base: str, key: str | None, body: dict[str, Any], wait: float, as_json: bool, hint: Any = None) -> None:
        calls.append({"api_key": key, **body})

    monkeypatch.setattr(cli_service, "submit_and_wait", submit)
    return calls


def test_relay_through_the_gateway_sends_no_validity_unless_given(submitted: list[dict[str, Any]]):
    assert client("relay", A3, "trip", "--api-key", KEY).exit_code == 0
    assert client("relay", A3, "trip", "--api-key", KEY).exit_code == 0
    # The same request twice, no validity: the gateway derives the same key, the second is the first command.
    expected = {"api_key": KEY, "kind": "relay", "address": A3, "params": {"action": "trip", "n2": 0}}
    assert submitted == [expected, expected]
    before = datetime.now(UTC)
    assert client("relay", A3, "trip", "--api-key", KEY, "--valid-minutes", "5").exit_code == 0
    until = datetime.fromisoformat(submitted[-1]["valid_until"])
    assert 4.9 * 60 < (until - before).total_seconds() < 5.1 * 60
    assert client("relay", A3, "trip", "--api-key", KEY, "--valid-until", "2099-01-01T00:00+08:00").exit_code == 0
    assert submitted[-1]["valid_until"] == "2099-01-01T00:00:00+08:00"
    both = client("relay", A3, "trip", "--valid-minutes", "5", "--valid-until", "2099-01-01T00:00+08:00")
    assert both.exit_code == 2 and "exclude each other" in both.output
    past = client("relay", A3, "trip", "--valid-until", "2001-01-01T00:00+08:00")
    assert past.exit_code == 2 and "in the past" in past.output
    assert len(submitted) == 4


def test_topup_kwh_sends_energy_for_an_energy_wallet(submitted: list[dict[str, Any]]):
    assert client("topup", A1, "25.50", "--api-key", KEY, "--kwh").exit_code == 0
    assert client("topup", A1, "25.50", "--api-key", KEY).exit_code == 0
    assert [c["params"] for c in submitted] == [
        {"energy_kwh": "25.50", "opening": False},
        {"amount": "25.50", "opening": False},
    ]


def test_relay_through_the_gateway_says_whether_a_trip_is_for_arrears(submitted: list[dict[str, Any]]):
    assert client("relay", A3, "trip", "--api-key", KEY, "--arrears").exit_code == 0
    assert client("relay", A3, "trip", "--api-key", KEY, "--not-arrears").exit_code == 0
    assert client("relay", A3, "trip", "--api-key", KEY).exit_code == 0
    assert [c["params"].get("arrears", "absent") for c in submitted] == [True, False, "absent"]
    direct = client("relay", "--bus", "tcp://127.0.0.1:1", A3, "trip", "--arrears")
    assert direct.exit_code == 2 and "leave out --bus" in direct.output


@pytest.mark.parametrize("command", [["topup", A1, "5.00"], ["tariff", A1, "0.50"], ["relay", A1, "trip"]])
def test_key_is_the_idempotency_key_and_api_key_the_api_key(submitted: list[dict[str, Any]], command: list[str]):
    assert client(*command, "--api-key", KEY, "--key", "order-77").exit_code == 0
    assert client(*command, "--api-key", KEY, "--idempotency-key", "order-77").exit_code == 0  # the alias
    env = {"METERLINK_API_KEY": "from-env", "METERLINK_GATEWAY": None}
    assert CliRunner().invoke(cli, [*command, "--key", "order-78"], env=env).exit_code == 0
    assert [(c["api_key"], c["idempotency_key"]) for c in submitted] == [
        (KEY, "order-77"),
        (KEY, "order-77"),
        ("from-env", "order-78"),
    ]
