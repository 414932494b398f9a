"""The simulator's admin HTTP/JSON interface: ground truth and test controls.

- ``GET  /meters/{address}``: a meter's true state (``address``, ``mode``, ``remaining_money``,
  ``overdraft`` (yuan, decimal strings), ``purchase_count``, ``relay`` ("closed", "open",
  "close_allowed"), ``energy_kwh`` (forward active total, decimal string), and more).
  ``wallet`` says which wallet the meter keeps: ``"money"`` (``remaining_money``/``overdraft``),
  ``"energy"`` (``remaining_energy_kwh``/``overdraft_energy_kwh`` in kWh, prepaid.md §1.8; the
  money fields are null) or null in remote cost control, which keeps no wallet (§1.1: every
  wallet field null, ``purchase_count`` 0).
- ``GET  /meters``: all addresses with their bus; ``GET /summary``: counts and bus statistics.
- ``PUT  /meters/{address}/load`` ``{"watts": 1500}`` (``null`` returns to the profile).
- ``POST /meters/{address}/button``: the customer presses the relay button.
- ``POST /meters/{address}/faults`` / ``POST /buses/{name}/faults``
  ``{"kind": "no_reply", "remaining": 3, "delay_ms": 700, "gap_ms": 600, "seconds": 0}``;
  ``DELETE`` the same paths (optionally ``?kind=``) to clear.
- ``POST /time/advance`` ``{"seconds": 3600}``; ``GET /time``; ``PUT /time/speed`` ``{"speed": 60}``.

Meters are advanced lazily when observed, so every read here is ground truth at the current
virtual time (``/summary`` advances the whole fleet).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from protocols.dlt645 import AddressError

from .faults import Fault, FaultSpec
from .fleet import Fleet


class LoadBody(BaseModel):
    watts: int | None = Field(description="Constant power in W (negative = export); null = the profile")


class FaultBody(BaseModel):
    kind: Fault
    remaining: int | None = Field(default=None, ge=1)
    delay_ms: int = Field(default=700, ge=0, le=60_000)
    gap_ms: int = Field(default=600, ge=0, le=60_000)
    seconds: int = 0
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    function: int | None = Field(default=None, ge=0, le=0x1F, description="Only replies to this function code")
    headroom_hundredths: int | None = Field(
        default=None, ge=0, le=99_999_999, description="rollover: distance below 999999.99 in 0.01 kWh"
    )
    registers: tuple[str, ...] = Field(
        default=("forward",), description="rollover: which registers move (forward, reverse, reactive)"
    )


def _spec(body: FaultBody) -> FaultSpec:
    try:
        return FaultSpec(**body.model_dump())
    except ValueError as exc:  # e.g. an unknown rollover register
        raise HTTPException(422, str(exc)) from None


class AdvanceBody(BaseModel):
    seconds: float = Field(gt=0, le=10 * 365 * 86400)


class SpeedBody(BaseModel):
    speed: float = Field(ge=0, le=1_000_000)


def create_app(fleet: Fleet) -> FastAPI:
    """The admin application for ``fleet``."""
    app = FastAPI(title="meterlink simulator admin", version="1")

    # Every handler is ``async def``: FastAPI then runs it on the event loop that also runs the
    # buses, never on its thread pool, so meters (not thread-safe) are only touched from that loop.

    def find(address: str) -> str:
        try:
            fleet.meter(address)
        except (KeyError, AddressError):
            raise HTTPException(404, f"no simulated meter {address}") from None
        return address

    @app.get("/meters")
    async def meters() -> list[dict[str, Any]]:
        return [{"address": a, "bus": m.bus} for a, m in fleet.meters.items()]

    @app.get("/meters/{address}")
    async def meter(address: str) -> dict[str, Any]:
        # A meter long unobserved catches up in slices that let the buses answer meanwhile.
        await fleet.catch_up_async([fleet.meter(find(address))])
        return fleet.state(address)

    @app.put("/meters/{address}/load")
    async def set_load(address: str, body: LoadBody) -> dict[str, Any]:
        fleet.set_load(find(address), body.watts)
        return fleet.state(address)

    @app.post("/meters/{address}/button")
    async def button(address: str) -> dict[str, Any]:
        closed = fleet.press_button(find(address))
        return {"closed": closed, **fleet.state(address)}

    @app.post("/meters/{address}/faults")
    async def meter_fault(address: str, body: FaultBody) -> dict[str, Any]:
        fleet.inject(find(address), _spec(body))
        return fleet.state(address)

    @app.delete("/meters/{address}/faults")
    async def clear_meter_faults(address: str, kind: Fault | None = None) -> dict[str, Any]:
        fleet.clear_faults(find(address), kind)
        return fleet.state(address)

    @app.post("/buses/{name}/faults")
    async def bus_fault(name: str, body: FaultBody) -> dict[str, Any]:
        if name not in fleet.buses:
            raise HTTPException(404, f"no bus {name}")
        fleet.inject(name, _spec(body))
        return {"bus": name, "faults": sorted(k.value for k in fleet.buses[name].faults.active)}

    @app.delete("/buses/{name}/faults")
    async def clear_bus_faults(name: str, kind: Fault | None = None) -> dict[str, Any]:
        if name not in fleet.buses:
            raise HTTPException(404, f"no bus {name}")
        fleet.clear_faults(name, kind)
        return {"bus": name, "faults": []}

    @app.get("/time")
    async def get_time() -> dict[str, Any]:
        return {"time": fleet.now().isoformat(), "speed": fleet.clock.speed}

    @app.post("/time/advance")
    async def advance(body: AdvanceBody) -> dict[str, Any]:
        return {"time": fleet.advance(timedelta(seconds=body.seconds)).isoformat(), "speed": fleet.clock.speed}

    @app.put("/time/speed")
    async def speed(body: SpeedBody) -> dict[str, Any]:
        fleet.clock.speed = body.speed
        return {"time": fleet.now().isoformat(), "speed": fleet.clock.speed}

    @app.get("/summary")
    async def summary() -> dict[str, Any]:
        return await fleet.summary_async()

    return app
