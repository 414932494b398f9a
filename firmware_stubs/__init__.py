"""What runs inside a meter, as deterministic state machines (time is always an argument)."""
