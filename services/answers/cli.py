"""`medretrain serve answers`: the answer service on the stack's Ray head (or the cluster in RAY_ADDRESS).

    medretrain serve answers                                  # http://127.0.0.1:18100/v1, Ctrl-C or SIGTERM stops
    medretrain --set serve.challenger_fraction=0.1 serve answers
"""

from __future__ import annotations

import signal
import threading

import typer

from deploy.cli_context import settings_of
from services.cli import console
from services.stream.cli import serve_group


def answers(ctx: typer.Context) -> None:
    """Serve the champion over HTTP until stopped; the application is then deleted."""
    from services.answers.app import deploy, undeploy
    from services.answers.keys import ensure_keys, keys_file

    settings = settings_of(ctx)
    ensure_keys(settings)  # before any replica starts: replicas only read the file
    deploy(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after ray.init, which installs a handler of its own
    console.print(f"answer service on http://{settings.serve.host}:{settings.serve.port}/v1 "
                  f"(API key in {keys_file(settings)}; OpenAPI at /docs)")
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        # Deleted, not abandoned: the route goes at once (new requests are refused), and requests in flight are
        # owed their answer for up to serve.drain_timeout_s, stored and queued for Kafka like any other.
        console.print("stopping: requests in flight may finish, then the application is deleted")
        undeploy(settings)


def register(app: typer.Typer) -> None:
    """Add ``serve answers`` to the root app."""
    serve_group(app).command("answers")(answers)
