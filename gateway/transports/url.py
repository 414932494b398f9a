"""Bus URLs: one string says how to reach a line.

==================================================  =============================================
URL                                                 transport
==================================================  =============================================
``serial:///dev/ttyUSB0?baud=2400&parity=E``         :class:`SerialTransport` on a local device
``serial://COM3?baud=9600``                          (Windows port names)
``socket://10.0.0.5:4001?baud=2400``                 :class:`SerialTransport`, pyserial ``socket://``
``rfc2217://10.0.0.5:2217?baud=2400&parity=E``       :class:`SerialTransport`, pyserial ``rfc2217://``
``tcp://10.0.0.5:4001?baud=2400``                    :class:`TcpClientTransport` (converter)
``mqtt://[user[:password]@]broker[:1883]/PREFIX/ID``  :class:`MqttTransport`; PREFIX may have several
                                                    levels, ID is the last one
``dtu://0.0.0.0:9000/ID?registration=REG:``          :class:`DtuTransport`: listen for 4G DTUs that
                                                    dial in; ID = the registration id, or (no
                                                    ``registration``) the meter address
``dtu://0.0.0.0:9000/ID?heartbeat=HB:&identify=heartbeat``  the same, the DTU known by the id in
                                                    its heartbeat packets
==================================================  =============================================

Serial options (``serial``, ``socket``, ``rfc2217``): ``baud`` (default 2400), ``parity``
``N``/``E``/``O`` (default ``E``, DL/T 645's 8E1), ``bytesize`` 5..8 (8), ``stopbits`` 1, 1.5
or 2 (1). For ``socket://`` the converter sets the real line; ``baud`` still tells the
scheduler the wire speed. ``tcp://`` and ``mqtt://`` take ``baud`` only (the line speed behind
the converter or DTU, for timeouts; without it the link assumes the meter profile's, e.g. 1200
for ``dlt645-1997``); ``mqtt://`` defaults to port 1883. Every MQTT transport in one process
(event loop) shares one connection per broker (host, port, user).

``dtu://HOST:PORT/ID`` listens on ``HOST:PORT`` (``0.0.0.0``: every interface) for DTUs that
dial in and is the line of the DTU called ``ID``. Options: ``registration`` (the prefix of the
DTU's registration packet, URL-encoded, e.g. ``REG:`` or ``%23%23``; the id follows it, up to
CR/LF/NUL or a 0.2 s silence: a packet split across TCP segments is waited for); ``heartbeat``
(bytes to drop from the stream; by default the registration packet when it is repeated);
``identify``, how the DTU is recognised: ``registration`` (the default with ``registration``),
``heartbeat`` (no registration packet, the id is in every heartbeat: ``heartbeat`` is then the
heartbeat's prefix, the id follows it as in a registration packet, and the first heartbeat
identifies the DTU) or ``meter`` (the default without ``registration``: by reading the address
of the meter behind it, 0x13 to the wildcard, so ``ID`` is that meter's address, e.g.
``000000000001``, and one meter per DTU); ``baud`` (the line speed behind the DTU, for
timeouts); ``wait`` (seconds ``open()`` waits for the DTU to dial in, default 5; a DTU known by
its heartbeat needs one heartbeat interval). Buses naming the same listen address share one
server (and must give it the same ``registration``, ``heartbeat`` and ``identify``).

Anything else raises :class:`~gateway.errors.BusUrlError` saying what is wrong. The transport
is returned **unopened**: ``async with open_transport(url) as t: ...`` or ``await t.open()``.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from protocols.dlt645 import Dlt645Error, normalize_address

from ..errors import BusUrlError
from .base import Transport
from .mqtt import DEFAULT_PORT, MqttTransport, check_topic_level
from .serial import BYTESIZES, PARITIES, STOPBITS, SerialTransport
from .tcp import IDENTIFY_MODES, DtuTransport, TcpClientTransport

SCHEMES = ("serial", "socket", "rfc2217", "tcp", "mqtt", "dtu")
DTU_OPTIONS = ("registration", "heartbeat", "identify", "baud", "wait")
SERIAL_OPTIONS = ("baud", "parity", "bytesize", "stopbits")
_WINDOWS_PORT = re.compile(r"COM\d+", re.IGNORECASE)


def _shown(url: str, parts: SplitResult) -> str:
    """The URL without its password, for error messages."""
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _options(parts: SplitResult, allowed: tuple[str, ...], shown: str) -> dict[str, str]:
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise BusUrlError(f"{shown}: bad query string {parts.query!r}: {exc}") from None
    for key, value in pairs:
        if key not in allowed:
            known = f"allowed: {', '.join(allowed)}" if allowed else f"{parts.scheme}:// takes no options"
            raise BusUrlError(f"{shown}: unknown option {key!r} ({known})")
        if key in options:
            raise BusUrlError(f"{shown}: option {key!r} given twice")
        options[key] = value
    return options


def _host_port(parts: SplitResult, shown: str, default_port: int | None = None) -> tuple[str, int]:
    try:
        port = parts.port
    except ValueError:
        hostport = parts.netloc.rpartition("@")[2]
        raise BusUrlError(f"{shown}: bad port in {hostport!r} (must be 1..65535)") from None
    host = parts.hostname
    if not host:
        raise BusUrlError(f"{shown}: missing host (use {parts.scheme}://HOST:PORT...)")
    if port is None:
        if default_port is None:
            raise BusUrlError(f"{shown}: missing port (use {parts.scheme}://{host}:PORT)")
        port = default_port
    if not 0 < port < 65536:
        raise BusUrlError(f"{shown}: port {port} is outside 1..65535")
    return host, port


def _int_option(options: dict[str, str], key: str, default: int, shown: str) -> int:
    raw = options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BusUrlError(f"{shown}: {key}={raw!r} is not a whole number") from None
    if value <= 0:
        raise BusUrlError(f"{shown}: {key}={raw!r} must be positive")
    return value


def _serial_settings(options: dict[str, str], shown: str) -> dict[str, object]:
    baud = _int_option(options, "baud", 2400, shown)
    parity = options.get("parity", "E").upper()
    if parity not in PARITIES:
        raise BusUrlError(f"{shown}: parity={options['parity']!r} is not one of {', '.join(PARITIES)}")
    bytesize = _int_option(options, "bytesize", 8, shown)
    if bytesize not in BYTESIZES:
        raise BusUrlError(f"{shown}: bytesize={bytesize} is not one of {', '.join(map(str, BYTESIZES))}")
    raw_stop = options.get("stopbits", "1")
    try:
        stopbits: float = float(raw_stop)
    except ValueError:
        raise BusUrlError(f"{shown}: stopbits={raw_stop!r} is not 1, 1.5 or 2") from None
    if stopbits not in STOPBITS:
        raise BusUrlError(f"{shown}: stopbits={raw_stop!r} is not 1, 1.5 or 2")
    if stopbits == int(stopbits):
        stopbits = int(stopbits)
    return {"baud": baud, "parity": parity, "bytesize": bytesize, "stopbits": stopbits}


def _no_extras(parts: SplitResult, shown: str, *, credentials: bool = False) -> None:
    if parts.fragment:
        raise BusUrlError(f"{shown}: unexpected fragment #{parts.fragment}")
    if not credentials and (parts.username is not None or parts.password is not None):
        raise BusUrlError(f"{shown}: {parts.scheme}:// URLs take no user or password")


def _dtu(url: str, parts: SplitResult, shown: str) -> DtuTransport:
    if "#" in url:
        raise BusUrlError(f"{shown}: write # in options as %23")
    _no_extras(parts, shown)
    host, port = _host_port(parts, shown)
    ident = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not ident:
        raise BusUrlError(f"{shown}: missing DTU id (use dtu://HOST:PORT/ID)")
    if "/" in ident or not ident.isprintable() or " " in ident:
        raise BusUrlError(f"{shown}: DTU id {ident!r} must be one printable word")
    options = _options(parts, DTU_OPTIONS, shown)
    raw: dict[str, bytes | None] = {}
    for key in ("registration", "heartbeat"):
        value = options.get(key)
        if value is not None and not value:
            raise BusUrlError(f"{shown}: empty {key}")
        raw[key] = value.encode("utf-8") if value else None
    identify = options.get("identify", "registration" if raw["registration"] is not None else "meter")
    if identify not in IDENTIFY_MODES:
        raise BusUrlError(f"{shown}: identify={identify!r} is not one of {', '.join(IDENTIFY_MODES)}")
    if identify == "registration" and raw["registration"] is None:
        raise BusUrlError(f"{shown}: identify=registration needs registration= (the packet's prefix)")
    if identify != "registration" and raw["registration"] is not None:
        raise BusUrlError(f"{shown}: registration= means identify=registration, not identify={identify}")
    if identify == "heartbeat" and raw["heartbeat"] is None:
        raise BusUrlError(f"{shown}: identify=heartbeat needs heartbeat= (the prefix the id follows)")
    if identify == "meter":
        try:
            ident = normalize_address(ident)
        except Dlt645Error as exc:
            raise BusUrlError(
                f"{shown}: without registration= a DTU is known by its meter's address; {ident!r} is not one ({exc})"
            ) from None
    baud = _int_option(options, "baud", 0, shown) if "baud" in options else None
    wait_raw = options.get("wait", "5")
    try:
        wait = float(wait_raw)
    except ValueError:
        raise BusUrlError(f"{shown}: wait={wait_raw!r} is not a number of seconds") from None
    if not 0 <= wait <= 3600:
        raise BusUrlError(f"{shown}: wait={wait_raw!r} must be 0..3600 seconds")
    return DtuTransport(
        host,
        port,
        ident,
        registration=raw["registration"],
        heartbeat=raw["heartbeat"],
        baud=baud,
        wait=wait,
        identify=identify,
    )


def open_transport(url: str) -> Transport:
    """The transport a bus URL describes (not opened yet); BusUrlError if the URL is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise BusUrlError("empty bus URL")
    url = url.strip()
    if "://" not in url:
        raise BusUrlError(f"{url!r} is not a bus URL (use one of {', '.join(s + '://' for s in SCHEMES)})")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BusUrlError(f"{url}: {exc}") from None
    shown = _shown(url, parts)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise BusUrlError(f"{shown}: unknown scheme {parts.scheme!r} (use one of {', '.join(SCHEMES)})")

    if scheme == "serial":
        _no_extras(parts, shown)
        if parts.path.startswith("//") or (parts.netloc.endswith(":") and parts.netloc[:-1] in SCHEMES):
            raise BusUrlError(f"{shown}: write pyserial URLs directly, e.g. socket://HOST:PORT or rfc2217://HOST:PORT")
        if parts.netloc:
            if parts.path or not _WINDOWS_PORT.fullmatch(parts.netloc):
                raise BusUrlError(
                    f"{shown}: the device must be an absolute path with three slashes, "
                    f"e.g. serial:///dev/ttyUSB0 (or a Windows port: serial://COM3)"
                )
            device = parts.netloc
        else:
            device = unquote(parts.path)
            if not device.startswith("/") or device == "/":
                raise BusUrlError(f"{shown}: missing device path (e.g. serial:///dev/ttyUSB0)")
        settings = _serial_settings(_options(parts, SERIAL_OPTIONS, shown), shown)
        return SerialTransport(device, **settings)  # type: ignore[arg-type]

    if scheme in ("socket", "rfc2217"):
        _no_extras(parts, shown)
        if parts.path not in ("", "/"):
            raise BusUrlError(f"{shown}: unexpected path {parts.path!r} (use {scheme}://HOST:PORT)")
        host, port = _host_port(parts, shown)
        settings = _serial_settings(_options(parts, SERIAL_OPTIONS, shown), shown)
        netloc = f"[{host}]" if ":" in host else host
        return SerialTransport(f"{scheme}://{netloc}:{port}", **settings)  # type: ignore[arg-type]

    if scheme == "tcp":
        _no_extras(parts, shown)
        if parts.path not in ("", "/"):
            raise BusUrlError(f"{shown}: unexpected path {parts.path!r} (use tcp://HOST:PORT)")
        host, port = _host_port(parts, shown)
        options = _options(parts, ("baud",), shown)
        baud = _int_option(options, "baud", 0, shown) if "baud" in options else None
        return TcpClientTransport(host, port, baud=baud)

    if scheme == "dtu":
        return _dtu(url, parts, shown)

    # mqtt
    if "#" in url:  # urlsplit would take it for a fragment
        raise BusUrlError(f"{shown}: MQTT topic must not contain wildcards (+ or #)")
    _no_extras(parts, shown, credentials=True)
    options = _options(parts, ("baud",), shown)
    baud = _int_option(options, "baud", 0, shown) if "baud" in options else None
    host, port = _host_port(parts, shown, DEFAULT_PORT)
    path = unquote(parts.path)
    if not path.startswith("/") or path == "/":
        raise BusUrlError(f"{shown}: missing topic (use mqtt://HOST:PORT/PREFIX/ID)")
    levels = path[1:].split("/")
    if len(levels) < 2:
        raise BusUrlError(f"{shown}: need a topic prefix and a DTU id (mqtt://HOST:PORT/PREFIX/ID), got {path!r}")
    if "" in levels:
        raise BusUrlError(f"{shown}: empty topic level in {path!r}")
    prefix, ident = "/".join(levels[:-1]), levels[-1]
    try:
        check_topic_level(prefix, "topic prefix", multi=True)
        check_topic_level(ident, "DTU id")
    except ValueError as exc:
        raise BusUrlError(f"{shown}: {exc}") from None
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return MqttTransport(host, port, prefix, ident, username=username, password=password, baud=baud)
