"""`medretrain` commands of the services (loop_cli)."""

import typer


def register(app: typer.Typer) -> None:
    """Add these commands to the root app."""
