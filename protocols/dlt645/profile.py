"""Per-meter-model profiles: where real meters differ from each other (dlt645.md §10, §10.1).

The gateway picks a profile per meter; the simulator gives each simulated meter one. Both
read the same object, so the two sides agree on every vendor variation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .control import Edition


@dataclass(frozen=True, slots=True)
class MeterProfile:
    """Wire-level behaviour of one meter model."""

    name: str
    edition: Edition = Edition.V2007
    request_preamble: int = 4
    """FE bytes the master sends to wake the meter (§1.2)."""
    reply_preamble: int = 4
    """FE bytes the meter puts before a reply: 0..4, vendor-dependent (FW-A: 4, §1.2)."""
    mac_level: int = 0x99
    """Password level meaning 'plaintext + MAC' (0x97 in FW-B's customised build, §2.3)."""
    cipher_level: int = 0x98
    """Password level meaning 'ciphertext + MAC' (0x96 in FW-B's build, §2.3)."""
    relay_reply_word: bool = False
    """Whether 0x1C replies carry the newer 2-byte execution/error word (§4.3)."""
    plaintext_trip: bool = False
    """Whether a plaintext 0x1C may trip (FW-B yes; FW-A/ANON-FW only close, §4.1)."""
    wildcard_reply_echo: bool = False
    """Whether a wildcard read is answered with the wildcard address (some 1997 meters, §1.5)."""
    baud: int = 2400
    parity: str = "E"
    """8E1 on a real line (§1.1); a pty cannot do parity (deps.md §3)."""

    def with_(self, **changes: object) -> MeterProfile:
        """A copy with some settings changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


SGCC_2013 = MeterProfile("sgcc-2013")
"""SGCC cost-control meter as FW-A implements it: levels 99/98, 1-byte 0x1C replies."""

SGCC_IOT = SGCC_2013.with_(name="sgcc-iot", relay_reply_word=True)
"""Newer IoT meters (FW-A 2014+ additions): 2-byte 0x1C execution and error words."""

FW_B = SGCC_2013.with_(name="fw-b", mac_level=0x97, cipher_level=0x96, plaintext_trip=True, reply_preamble=0)
"""The customised single-phase build (FW-B): levels 97/96, plaintext trip accepted."""

DLT645_1997 = MeterProfile("dlt645-1997", edition=Edition.V1997, baud=1200, reply_preamble=0, wildcard_reply_echo=True)
"""A 1997 meter: 2-byte DIs, 1200 bps initial rate, echoes the wildcard address."""

PROFILES: dict[str, MeterProfile] = {p.name: p for p in (SGCC_2013, SGCC_IOT, FW_B, DLT645_1997)}
"""Profiles by name, for configuration files."""
