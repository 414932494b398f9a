"""Fleets of simulated meters on virtual clocks, bus emulation, transports and faults."""
