"""The layout's rules (DEVELOPERS.md), checked on the source: imports point one way, the codec
and the firmware model do no I/O and read no clock.

* ``protocols`` imports none of the other three packages, and no sockets, asyncio or threads;
* ``firmware_stubs`` imports only ``protocols`` of ours, and no I/O either;
* ``gateway`` never imports ``simulator`` or ``firmware_stubs``;
* ``simulator`` imports ``gateway`` only in ``simulator/demo.py`` (the one module that wires
  both halves together, like an integration test);
* neither ``protocols`` nor ``firmware_stubs`` reads the wall clock (``datetime.now``,
  ``time.time``, ``time.monotonic``, ``date.today``): time is an argument.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("protocols", "firmware_stubs", "simulator", "gateway")
IO_MODULES = {"asyncio", "socket", "selectors", "threading", "subprocess", "serial", "aiomqtt", "paho", "http"}
CLOCK_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("date", "today"), ("time", "time"), ("time", "monotonic")}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("protocols", {"firmware_stubs", "simulator", "gateway"} | IO_MODULES),
        ("firmware_stubs", {"simulator", "gateway"} | IO_MODULES),
        ("gateway", {"simulator", "firmware_stubs"}),
    ],
)
def test_imports_point_one_way(package: str, forbidden: set[str]) -> None:
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden) for p in _files(package)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_simulator_imports_the_gateway_only_in_the_demo() -> None:
    assert {"protocols", "asyncio"} <= _imports(ROOT / "gateway" / "link.py")  # the scanner sees imports
    users = sorted(str(p.relative_to(ROOT)) for p in _files("simulator") if "gateway" in _imports(p))
    assert users == ["simulator/demo.py"]


@pytest.mark.parametrize("package", ["protocols", "firmware_stubs"])
def test_no_wall_clock_in_the_codec_and_the_firmware(package: str) -> None:
    found = []
    for path in _files(package):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
                if (name, node.func.attr) in CLOCK_CALLS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}.{node.func.attr}()")
    assert found == []


def test_a_subcommand_imports_only_what_it_needs() -> None:
    """``meterlink sim`` loads the simulator's command, not the demo (which imports the gateway's
    service); a plug-in that fails to load fails alone, with one line (gateway/cli/__init__.py)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from gateway.cli import cli\n"
        "r = CliRunner().invoke(cli, ['sim', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('simulator.demo', 'gateway.service', 'fastapi') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_a_broken_plug_in_fails_alone_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    from click.testing import CliRunner

    import gateway.cli as cli_module

    broken = EntryPoint(name="broken", value="no_such_module_here:cmd", group="meterlink.commands")
    monkeypatch.setattr(cli_module, "_plugins", lambda: {"broken": broken})
    result = CliRunner().invoke(cli_module.cli, ["broken"])
    assert result.exit_code == 1 and result.output.startswith("Error: the broken command cannot be loaded")
    assert CliRunner().invoke(cli_module.cli, ["decode", "68AAAAAAAAAAAA68110433333433AE16"]).exit_code == 0
