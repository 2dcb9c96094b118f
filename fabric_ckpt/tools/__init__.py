"""The tools behind the ``fabric-ckpt`` command: inspect, verify, diff, convert, consolidate."""
