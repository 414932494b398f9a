"""The I/O side: transports, bus scheduling, meter client, command service and northbound APIs."""
