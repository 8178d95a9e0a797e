"""Shifted question streams for calibrating and testing the drift detector.

    questions = consumer_questions(["glaucoma", "asthma"], n=200, seed=3)

MedQuAD questions are written by curators in a few templates ("What are the symptoms of X?").
People asking a deployed assistant write differently: first person, worries, context. These
templates produce such consumer-style questions about real MedQuAD topics, so a shift in
style is measured without a shift in topic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

CONSUMER_TEMPLATES = (
    "my mom was just diagnosed with {focus}, what should our family expect over the next few years?",
    "is it normal to feel this tired all the time with {focus} or should i go back to my doctor",
    "can i still drink coffee and exercise if i have {focus}?",
    "my 6 year old son has {focus}. will he grow out of it?",
    "what natural remedies actually work for {focus}, i don't want to take pills",
    "how worried should i be about {focus}? my dad had it and i'm 45",
    "does insurance usually cover treatment for {focus} and how much does it cost",
    "i think i might have {focus} but my doctor says it's stress. how can i be sure?",
    "can {focus} be passed to my baby during pregnancy?",
    "what's the best diet if you've got {focus}? any foods to avoid?",
    "my wife keeps forgetting things since she got {focus}, is that part of it?",
    "is {focus} contagious? my coworker has it and we share an office",
    "how long can someone live with {focus} if they don't get treated?",
    "can stress make {focus} worse? work has been crazy lately",
    "is there a support group for people with {focus} near me or online?",
    "i was told i have {focus} after a blood test, what questions should i ask at my next appointment?",
    "can i travel by plane with {focus}?",
    "why does my {focus} flare up at night and what can i do about it",
    "my grandmother has {focus} and won't take her meds, how do i talk to her?",
    "are there any new clinical trials for {focus} that i could join?",
)


def consumer_questions(focuses: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` distinct consumer-style questions about the given topics (seeded)."""
    topics = sorted({f.strip() for f in focuses if f and f.strip()})
    if len(topics) * len(CONSUMER_TEMPLATES) < n:
        raise ValueError(
            f"{len(topics)} topics x {len(CONSUMER_TEMPLATES)} templates cannot give {n} distinct questions"
        )
    rng = random.Random(seed)
    chosen: set[tuple[int, str]] = set()
    while len(chosen) < n:
        chosen.add((rng.randrange(len(CONSUMER_TEMPLATES)), rng.choice(topics)))
    pairs = sorted(chosen)
    rng.shuffle(pairs)
    return [CONSUMER_TEMPLATES[t].format(focus=topic.lower()) for t, topic in pairs]
