"""A stand-in for the sglang package: only ``launch_server`` (see launch_server.py)."""
