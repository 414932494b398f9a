"""Transports to RS-485 lines, behind one interface (:class:`Transport`), chosen by URL.

* :class:`SerialTransport` — a local serial device, or pyserial's ``socket://`` / ``rfc2217://``;
* :class:`TcpClientTransport` — an RS-485-to-Ethernet converter (``tcp://``);
* :class:`DtuServer` / :class:`DtuConnection` — 4G DTUs that dial in over TCP, keyed by id;
  :class:`DtuTransport` — the line of one of them (``dtu://``);
* :class:`MqttTransport` on a shared :class:`MqttConnection` — DTUs behind an MQTT broker;
* :func:`open_transport` — the transport for a bus URL.
"""

from .base import Transport
from .mqtt import BROKER_INFLIGHT_LIMIT, MqttConnection, MqttStats, MqttTransport
from .serial import SerialTransport
from .tcp import DtuConnection, DtuServer, DtuTransport, TcpClientTransport, read_meter_address
from .url import open_transport

__all__ = [
    "BROKER_INFLIGHT_LIMIT",
    "DtuConnection",
    "DtuServer",
    "DtuTransport",
    "MqttConnection",
    "MqttStats",
    "MqttTransport",
    "SerialTransport",
    "TcpClientTransport",
    "Transport",
    "open_transport",
    "read_meter_address",
]
