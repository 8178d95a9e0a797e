"""The demo's scripted user of the answer service: asks held-out production questions and reviews each answer.

    user = ScriptedUser(settings)
    user.wait_ready(timeout_s=300)
    first = user.wait_for_version("2", probe="What is glaucoma?", timeout_s=60)   # the hot swap, seen by a user
    review = user.ask_and_review(pairs)          # Review(answers, ups, corrections, event_ids)

The review is the one a clinician with the reference answer at hand would give: +1 when the model's answer is
close to the reference (ROUGE-L F-measure >= ``CLOSE_ROUGE_L``), otherwise a correction whose text is the
reference. Both are verified pairs, so both become QA events; the user never sends a bare -1.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import httpx

from schemas.events import QAEvent
from schemas.serving import AnswerRequest, AnswerResponse, FeedbackRequest, FeedbackResponse
from schemas.settings import Settings

CLOSE_ROUGE_L = 0.3
"""A small model's answer this close to the reference is worth a +1; below it the reference is the better answer."""
SESSION = "demo-user"


@dataclass
class Review:
    answers: list[tuple[str, AnswerResponse, float]] = field(default_factory=list)
    """Each question, its answer and the answer's ROUGE-L against the reference."""
    ups: int = 0
    corrections: int = 0
    event_ids: list[uuid.UUID] = field(default_factory=list)
    """The QA events the feedback produced (one per reviewed answer)."""


def review_of(answer: AnswerResponse, reference: str) -> tuple[FeedbackRequest, float]:
    """+1 for an answer close to the reference, else a correction with the reference; and the ROUGE-L."""
    from evaluator.scoring import overlap_scores

    rouge = overlap_scores([answer.answer or " "], [reference])["rougeL"]
    if rouge >= CLOSE_ROUGE_L:
        return FeedbackRequest(answer_id=answer.answer_id, rating=1), rouge
    return FeedbackRequest(answer_id=answer.answer_id, rating=-1, corrected_answer=reference), rouge


class ScriptedUser:
    def __init__(self, settings: Settings) -> None:
        from services.answers.client import service_url
        from services.answers.keys import ensure_keys

        self.http = httpx.Client(base_url=f"{service_url(settings)}/v1", timeout=120.0,
                                 headers={"Authorization": f"Bearer {ensure_keys(settings).api_key}"})

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``/v1/readyz`` says a version is loaded (the service answers 503 before)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:  # not listening yet
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the answer service at {self.http.base_url} was not ready within {timeout_s:.0f}s")

    def ask(self, question: str) -> AnswerResponse:
        response = self.http.post("/answers", json=AnswerRequest(question=question, session_id=SESSION)
                                  .model_dump(mode="json", exclude_none=True))
        response.raise_for_status()
        return AnswerResponse.model_validate_json(response.content)

    def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        response = self.http.post("/feedback", json=request.model_dump(mode="json", exclude_none=True))
        response.raise_for_status()
        return FeedbackResponse.model_validate_json(response.content)

    def wait_for_version(self, version: str, probe: str, timeout_s: float) -> AnswerResponse:
        """The first answer served by ``version`` (the service swaps within seconds of the alias move)."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.ask(probe)
            if answer.model_version == version or time.monotonic() > deadline:
                return answer
            time.sleep(1.0)

    def ask_and_review(self, pairs: list[QAEvent]) -> Review:
        """Ask each pair's question, then review the answer against the pair's answer (the reference)."""
        review = Review()
        for pair in pairs:
            answer = self.ask(pair.question)
            request, rouge = review_of(answer, pair.answer)
            review.answers.append((pair.question, answer, rouge))
            review.ups += request.corrected_answer is None
            review.corrections += request.corrected_answer is not None
            if (event_id := self.feedback(request).event_id) is not None:
                review.event_ids.append(event_id)
        return review

    def close(self) -> None:
        self.http.close()
