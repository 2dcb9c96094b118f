"""``python -m fabric_ckpt``: the ``fabric-ckpt`` command (see :mod:`fabric_ckpt.cli`)."""

from fabric_ckpt.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
