"""What every command group gets from the CLI root, without importing it (the root sits in the top layer).

    from deploy.cli_context import settings_of
    settings = settings_of(ctx)          # inside a typer command
"""

from __future__ import annotations

import typer

from schemas.settings import Settings


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings built by the root callback (env + ``--set`` overrides)."""
    return ctx.find_root().obj
