"""Sans-I/O protocol codecs shared by the gateway and the simulator.

Bytes in, typed values out, and back. Nothing in this package opens a socket, starts an
event loop or reads the clock.
"""
