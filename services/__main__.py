"""``python -m services ...`` is the ``medretrain`` command (used to spawn the long-running services)."""

from services.cli import main

main()
