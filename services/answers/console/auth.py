"""Console sign-in: a name and a key give a signed session cookie; a per-session token guards every form.

The api key signs a person in to ask and give feedback; the reviewer key also to promote, reject and roll
back. The cookie is signed with a secret derived from both keys, so rotating a key signs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import unicodedata
from dataclasses import asdict, dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from services.answers.keys import ApiKeys

ROLE_USER, ROLE_REVIEWER = "user", "reviewer"
SESSION_COOKIE, FLASH_COOKIE = "medretrain_console", "medretrain_console_flash"
NAME_MAX_CHARS = 80
FLASH_MAX_AGE_S = 120


@dataclass(frozen=True)
class Session:
    name: str
    """The signed-in name: the actor every action of this session is recorded with."""
    role: str
    csrf: str
    """Token every state-changing form of this session carries back."""
    sid: str
    """Stable per sign-in: the canary split's session id, so one person stays on one version."""

    @property
    def reviewer(self) -> bool:
        return self.role == ROLE_REVIEWER


def check_name(raw: str) -> str:
    """The name to record, or ValueError saying what is wrong with it."""
    name = " ".join(raw.split())
    if not name:
        raise ValueError("enter your name: it is recorded with every action you take")
    if len(name) > NAME_MAX_CHARS:
        raise ValueError(f"a name has at most {NAME_MAX_CHARS} characters")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise ValueError("a name cannot hold control characters")
    return name


class Sessions:
    """Issues and reads the session and flash cookies of one key pair."""

    def __init__(self, keys: ApiKeys, max_age_s: float) -> None:
        secret = hmac.new(f"{keys.api_key}\n{keys.reviewer_key}".encode(), b"medretrain console",
                          hashlib.sha256).hexdigest()
        self._session = URLSafeTimedSerializer(secret, salt="console-session")
        self._flash = URLSafeTimedSerializer(secret, salt="console-flash")
        self.keys, self.max_age_s = keys, max_age_s

    def role_for(self, key: str) -> str | None:
        """The role a key grants, compared in constant time; None for a wrong key."""
        given = key.strip().encode()
        if hmac.compare_digest(given, self.keys.reviewer_key.encode()):
            return ROLE_REVIEWER
        if hmac.compare_digest(given, self.keys.api_key.encode()):
            return ROLE_USER
        return None

    def issue(self, name: str, role: str) -> str:
        session = Session(name=name, role=role, csrf=secrets.token_urlsafe(24), sid=secrets.token_urlsafe(12))
        return self._session.dumps(asdict(session))

    def read(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            return Session(**self._session.loads(cookie, max_age=self.max_age_s))
        except (BadSignature, TypeError):
            return None

    def flash(self, message: str, ok: bool) -> str:
        return self._flash.dumps({"message": message, "ok": ok})

    def read_flash(self, cookie: str | None) -> dict | None:
        if not cookie:
            return None
        try:
            return self._flash.loads(cookie, max_age=FLASH_MAX_AGE_S)
        except BadSignature:
            return None


def csrf_matches(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(token.encode(), session.csrf.encode())
