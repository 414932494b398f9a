"""Codec micro-benchmark: meterlink's read fast path against the PyPI ``dlt645`` package.

Run from the repository root: ``.venv/bin/python bench/codec.py`` (needs the ``test`` extra,
which pins ``dlt645==3.2.0``; ``dlt645`` is used here only as the yardstick).

What is measured, in one run, on one CPU thread:

* encode — a 0x11 read request for the combined active energy total (DI 00000000) with four
  ``FE`` preamble bytes: ours ``read.encode_read_request(address, di)`` (address string and
  DI integer in) against ``DLT645Protocol.build_frame(addr, CtrlCode.ReadData, di)`` (address
  and DI already packed to bytes, its default four ``FE``);
* decode — framing plus value of the meter's 0x91 reply (``FE``x4, 20-byte frame, 123456.78
  kWh): ours ``read.decode_read_reply(raw)`` -> (address, data item, ``Decimal``) against
  ``cli.handle_response(DLT645Protocol.deserialize(raw))`` -> ``DataItem`` with a float.

Both sides get the very same bytes: ``dlt645`` sends its address string's bytes in written
order, so its client is given the wire order of our address and the frames are identical (the
script checks this, and that both decode the same value, before timing). Each figure is the
median of several ``timeit.repeat`` runs (the minimum is printed too). Note that part of
``dlt645``'s decode cost is an eagerly formatted ``log.debug`` message in ``deserialize``; it
is paid whether or not its logging is enabled (it is off here, as by default).

Baseline on the development machine (CPython 3.11.7, when this script was written): about
1.9 us to decode ours against 12.8 us for ``dlt645``, and 0.64 us against 3.6 us to encode,
i.e. ``decode_x`` about 6.8 and ``encode_x`` about 5.6. Targets: ``decode_x`` >= 5 and
``encode_x`` >= 3.

The last line printed is exactly ``decode_x=<ratio> encode_x=<ratio>`` (ours over theirs:
how many times faster ours is, 2 decimals), for scripts to parse.
"""

from __future__ import annotations

import platform
import statistics
import struct
import sys
import timeit
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from protocols.dlt645.payloads import ReadReply, encode_payload
from protocols.dlt645.read import decode_read_reply, encode_read_request
from protocols.dlt645.table import DI_2007

try:
    import dlt645
    from dlt645 import CtrlCode, DLT645Protocol, MeterClientService
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench/codec.py needs dlt645==3.2.0: .venv/bin/pip install -e '.[test]'")

ADDRESS = "121078563412"  # ours: nameplate order, sent low byte first
THEIR_ADDRESS = bytes.fromhex(ADDRESS)[::-1].hex()  # "123456781012": dlt645 sends it as written
DI = 0x00000000  # combined active energy, total (XXXXXX.XX kWh)
VALUE = Decimal("123456.78")
REPEAT = 7
TARGET_MS = 200  # aim for about this long per repeat


def per_op(fn: Callable[[], Any]) -> tuple[float, float]:
    """(median, min) seconds per call of ``fn`` over ``REPEAT`` timed runs."""
    number = 1
    while True:  # calibrate like ``timeit``'s autorange, but to a longer run
        t = timeit.timeit(fn, number=number)
        if t >= TARGET_MS / 1000 / 4:
            break
        number *= 2
    number = max(1, int(number * (TARGET_MS / 1000) / t))
    runs = [t / number for t in timeit.repeat(fn, number=number, repeat=REPEAT)]
    return statistics.median(runs), min(runs)


def main() -> int:
    dlt645.disable_logging()
    cli = MeterClientService(None)  # no transport: only its request builder / reply parser
    if not cli.set_address(THEIR_ADDRESS):
        raise SystemExit("dlt645 refused the address")
    their_addr = bytes(cli.address)
    their_di = struct.pack("<I", DI)

    # The reply a meter would send, built by our general path (payloads + table).
    reply = encode_payload(ADDRESS, ReadReply(DI, DI_2007.lookup(DI).encode(VALUE)), preamble=4)

    # --- correctness before timing ---------------------------------------------------------
    ours_req = encode_read_request(ADDRESS, DI)
    theirs_req = bytes(DLT645Protocol.build_frame(their_addr, CtrlCode.ReadData, their_di))
    assert ours_req == theirs_req, (ours_req.hex(" "), theirs_req.hex(" "))
    address, item, ours_value = decode_read_reply(reply)
    their_item = cli.handle_response(DLT645Protocol.deserialize(reply))
    assert their_item is not None, "dlt645 rejected the reply"
    assert address == ADDRESS and item.di == DI
    assert ours_value == VALUE == Decimal(repr(their_item.value)), (ours_value, their_item.value)

    # --- timing ----------------------------------------------------------------------------
    deserialize, handle_response = DLT645Protocol.deserialize, cli.handle_response
    build_frame, read_data = DLT645Protocol.build_frame, CtrlCode.ReadData
    cases = {
        ("encode", "ours"): lambda: encode_read_request(ADDRESS, DI),
        ("encode", "dlt645"): lambda: build_frame(their_addr, read_data, their_di),
        ("decode", "ours"): lambda: decode_read_reply(reply),
        ("decode", "dlt645"): lambda: handle_response(deserialize(reply)),
    }
    print(f"python {platform.python_version()} ({platform.python_implementation()}), dlt645 {dlt645.__version__}")
    print(f"request {len(ours_req)} bytes, reply {len(reply)} bytes, {REPEAT} repeats, median (min)")
    results = {}
    for (op, side), fn in cases.items():
        median, best = per_op(fn)
        results[op, side] = median
        print(f"{op:6} {side:6} {1 / median:>12,.0f} ops/s  {median * 1e6:7.3f} us  ({best * 1e6:.3f} us min)")
    decode_x = results["decode", "dlt645"] / results["decode", "ours"]
    encode_x = results["encode", "dlt645"] / results["encode", "ours"]
    print(f"decode_x={decode_x:.2f} encode_x={encode_x:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
