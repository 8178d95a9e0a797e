"""The console's routes under ``/console``: sign-in, Ask, Review, Pipeline; every action a plain form POST.

Each POST checks the session and its form token, acts, and redirects to a page (POST-redirect-GET) that shows
the outcome once. Ask and feedback call the backend methods the ``/v1`` routes call.
"""

from __future__ import annotations

import functools
import logging
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from services.answers.console.auth import (
    FLASH_COOKIE,
    SESSION_COOKIE,
    Session,
    Sessions,
    check_name,
    csrf_matches,
)

log = logging.getLogger(__name__)

PREFIX = "/console"
"""The console's path under the application's own route prefix (a request's ``root_path``)."""
HERE = Path(__file__).parent
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'"}
"""Pages are never cached nor framed (a framed promote button could be clicked for someone)."""


class Console:
    """What the routes share: the backend, the session cookies and the templates."""

    def __init__(self, backend) -> None:
        self.backend, self.settings = backend, backend.settings
        self.sessions = Sessions(backend.keys, backend.settings.serve.console_session_h * 3600)
        self.templates = Jinja2Templates(directory=HERE / "templates")
        # A run's logged plots never change: each is fetched from MLflow once.
        self.plot = functools.lru_cache(maxsize=64)(functools.partial(run_artifact, backend.settings))

    def session(self, request: Request) -> Session | None:
        return self.sessions.read(request.cookies.get(SESSION_COOKIE))

    def page(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        flash = self.sessions.read_flash(request.cookies.get(FLASH_COOKIE))
        response = self.templates.TemplateResponse(
            request, template, {"session": self.session(request), "flash": flash, "prefix": base(request),
                                **context}, status_code=status_code, headers=HEADERS)
        if flash:
            response.delete_cookie(FLASH_COOKIE, path=base(request))
        return response

    def redirect(self, request: Request, path: str, message: str | None = None, ok: bool = True) -> Response:
        response = RedirectResponse(f"{base(request)}{path}", status_code=303)
        if message:
            response.set_cookie(FLASH_COOKIE, self.sessions.flash(message, ok), path=base(request), httponly=True,
                                samesite="lax", max_age=120)
        return response

    def post(self, router: APIRouter, path: str, reviewer: bool = False):
        """Register ``handler(request, session, form)`` as the POST of ``path``, once session and token are good."""

        def register(handler):
            async def checked(request: Request) -> Response:
                result = await self.posted(request, reviewer)
                return result if isinstance(result, Response) else await handler(request, *result)

            router.add_api_route(path, checked, methods=["POST"])
            return handler

        return register

    async def posted(self, request: Request, reviewer: bool = False) -> tuple[Session, dict[str, str]] | Response:
        """(session, form fields) of a POST whose session and token are good, else the refusal to send."""
        session = self.session(request)
        if session is None:
            return self.page(request, "signin.html", 401, problem="sign in first")
        form = await form_fields(request)
        if form is None or not csrf_matches(session, form.get("csrf")):
            return self.page(request, "error.html", 403, problem="this form's token is missing or out of date "
                             "(signed in again elsewhere?): reload the page and try again; nothing was done")
        if reviewer and not session.reviewer:
            return self.page(request, "error.html", 403, problem="review actions need the reviewer key: "
                             "sign in with it; nothing was done")
        return session, form


def base(request: Request) -> str:
    """The console's URL path as the browser sees it (behind a Serve route prefix too)."""
    return request.scope.get("root_path", "").rstrip("/") + PREFIX


async def form_fields(request: Request) -> dict[str, str] | None:
    """An urlencoded form's fields (first value of each), or None for another body or bytes that are not UTF-8."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    try:
        fields = parse_qs((await request.body()).decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    return {key: values[0] for key, values in fields.items()}


def problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_url=False))


def console_router(backend) -> APIRouter:
    """The console's routes on ``backend`` (an AnswerBackend that also holds the store's ``engine``)."""
    from services.answers.console import views

    console = Console(backend)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    _add_access(router, console)
    views.add_ask(router, console)
    views.add_review(router, console)
    views.add_pipeline(router, console)
    _add_files(router, console)
    return router


def _add_access(router: APIRouter, console: Console) -> None:
    @router.get("")
    @router.get("/")
    async def home(request: Request) -> Response:
        return console.redirect(request, "/ask" if console.session(request) else "/signin")

    @router.get("/signin")
    async def signin_page(request: Request) -> Response:
        return console.page(request, "signin.html")

    @router.post("/signin")
    async def signin(request: Request) -> Response:
        form = await form_fields(request) or {}
        role = console.sessions.role_for(form.get("key", ""))
        try:
            name = check_name(form.get("name", ""))
        except ValueError as e:
            return console.page(request, "signin.html", 400, problem=str(e), name=form.get("name", ""))
        if role is None:
            log.warning("console sign-in refused for %r: wrong key", name)
            return console.page(request, "signin.html", 401, problem="wrong key", name=name)
        response = console.redirect(request, "/ask", f"signed in as {name} ({role})")
        response.set_cookie(SESSION_COOKIE, console.sessions.issue(name, role), path=base(request), httponly=True,
                            samesite="lax", secure=request.url.scheme == "https",
                            max_age=int(console.sessions.max_age_s))
        return response

    @console.post(router, "/signout")
    async def signout(request: Request, session: Session, form: dict[str, str]) -> Response:
        response = console.redirect(request, "/signin", "signed out")
        response.delete_cookie(SESSION_COOKIE, path=base(request))
        return response


def _add_files(router: APIRouter, console: Console) -> None:
    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            return Response(status_code=404)
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                        headers={"Cache-Control": "max-age=300"})

    @router.get("/artifacts/{run_id}/{path:path}")
    async def artifact(request: Request, run_id: str, path: str) -> Response:
        """A run's report or drift plot, fetched from MLflow here so the browser needs no MLflow access."""
        if console.session(request) is None:
            return Response("sign in first", status_code=401)
        plot = path == "drift_report.png" or (path.startswith("report/") and path.endswith(".png"))
        if not (plot and run_id.isalnum() and ".." not in path):
            return Response("not a plot of a run", status_code=404)
        try:
            data = await run_in_threadpool(console.plot, run_id, path)
        except Exception as e:  # noqa: BLE001 - missing, or MLflow down: the page renders without it
            return Response(f"not available: {e}", status_code=404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def run_artifact(settings, run_id: str, path: str) -> bytes:
    """A logged artifact's bytes."""
    import tempfile

    from deploy.registry import mlflow_client

    with tempfile.TemporaryDirectory(prefix="medretrain-console-") as tmp:
        return Path(mlflow_client(settings).download_artifacts(run_id, path, tmp)).read_bytes()


def answer_path(answer_id: uuid.UUID | str) -> str:
    return f"/ask?answer={quote(str(answer_id))}"

