"""The console's pages: Ask (answers and feedback through the backend, as ``/v1``), Review, Pipeline."""

from __future__ import annotations

import uuid
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import select

from schemas.serving import AnswerRequest, FeedbackRequest
from services.answers.console.auth import Session
from services.answers.console.routes import Console, answer_path, problems


def shown_answer(engine, answer_id: str, session_id: str):
    """(answer row, feedback row or None) of an answer this session was given, or None."""
    from services.answers.records import AnswerRow, FeedbackRow

    try:
        uuid.UUID(answer_id)
    except ValueError:
        return None
    with engine.connect() as conn:
        answer = conn.execute(select(AnswerRow).where(AnswerRow.answer_id == answer_id,
                                                      AnswerRow.session_id == session_id)).first()
        if answer is None:
            return None
        feedback = conn.execute(select(FeedbackRow).where(FeedbackRow.answer_id == answer_id)).first()
    return answer, feedback


def add_ask(router: APIRouter, console: Console) -> None:
    backend = console.backend

    @router.get("/ask")
    async def ask_page(request: Request, answer: str = "") -> Response:
        session = console.session(request)
        if session is None:
            return console.redirect(request, "/signin")
        shown = await run_in_threadpool(shown_answer, backend.engine, answer, session.sid) if answer else None
        return console.page(request, "ask.html", answer=shown[0] if shown else None,
                            feedback=shown[1] if shown else None)

    @console.post(router, "/ask")
    async def ask(request: Request, session: Session, form: dict[str, str]) -> Response:
        from services.answers.api import NotReady

        try:
            payload = AnswerRequest(question=form.get("question", "").strip(), session_id=session.sid)
            response = await backend.answer(payload)
        except ValidationError as e:
            return console.redirect(request, "/ask", f"question not sent: {problems(e)}", ok=False)
        except NotReady as e:
            return console.redirect(request, "/ask", f"no answer: {e}; try again shortly", ok=False)
        return console.redirect(request, answer_path(response.answer_id))

    @console.post(router, "/feedback")
    async def feedback(request: Request, session: Session, form: dict[str, str]) -> Response:
        message, ok = await run_in_threadpool(give_feedback, console, session, form)
        return console.redirect(request, answer_path(form.get("answer_id", "")), message, ok)


def give_feedback(console: Console, session: Session, form: dict[str, str]) -> tuple[str, bool]:
    """(message, accepted) of one feedback form, recorded through the backend exactly as ``/v1/feedback`` does."""
    from services.answers.records import FeedbackConflict, UnknownAnswer

    shown = shown_answer(console.backend.engine, form.get("answer_id", ""), session.sid)
    if shown is None:
        return "no such answer was given to you", False
    corrected = form.get("corrected_answer", "").strip() or None
    if corrected is not None and corrected == shown[0].answer.strip():
        return "the correction is the answer unchanged: edit it, or rate it +1", False
    try:
        request = FeedbackRequest(answer_id=form["answer_id"], rating=int(form.get("rating", "0")),
                                  corrected_answer=corrected)
        response = console.backend.feedback(request)
    except ValidationError as e:
        return f"feedback not recorded: {problems(e)}", False
    except (UnknownAnswer, FeedbackConflict, ValueError) as e:
        return f"feedback not recorded: {e}", False
    if not response.accepted:
        return "this feedback was already recorded", True
    kept = "it becomes training data" if response.event_id else "thank you (a -1 alone is not training data)"
    return f"feedback recorded: {kept}", True


def add_review(router: APIRouter, console: Console) -> None:
    from services.answers.console.review import (
        NothingToReview,
        Refused,
        act,
        load_review,
    )

    @router.get("/review")
    async def review_page(request: Request, version: str = "") -> Response:
        if console.session(request) is None:
            return console.redirect(request, "/signin")
        try:
            review = await run_in_threadpool(load_review, console.settings, console.backend.engine, version)
        except NothingToReview as e:
            return console.page(request, "review.html", 404 if version else 200, review=None, problem=str(e),
                                versions=e.versions)
        return console.page(request, "review.html", review=review, versions=review.versions)

    @console.post(router, "/review", reviewer=True)
    async def review_action(request: Request, session: Session, form: dict[str, str]) -> Response:
        back = f"/review?version={quote(form.get('version', ''))}"
        try:
            done = await run_in_threadpool(act, console.settings, session, form)
        except Refused as e:
            return console.redirect(request, back, str(e), ok=False)
        message = f"version {done.version}: {done.action} by {done.actor}"
        return console.redirect(request, f"/review?version={done.version}", message)


def add_pipeline(router: APIRouter, console: Console) -> None:
    from services.answers.console.pipeline import load_pipeline

    @router.get("/pipeline")
    async def pipeline_page(request: Request, part: str = "") -> Response:
        if console.session(request) is None:
            return console.redirect(request, "/signin")
        pipeline = await run_in_threadpool(load_pipeline, console.settings, console.backend.status())
        name = "_pipeline_body.html" if part == "body" else "pipeline.html"
        return console.page(request, name, pipeline=pipeline)
