"""Accounts for CLIPSCOPE_AUTH=password: salted scrypt hashes (standard library), constant-time checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from clipscope.db.models import User

N, R, P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"scrypt${N}${R}${P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32)
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def authenticate(session: Session, username: str, password: str) -> bool:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        verify_password(password, hash_password("timing-equaliser"))  # same cost whether or not the user exists
        return False
    return verify_password(password, user.password_hash)


def add_user(session: Session, username: str, password: str) -> None:
    """Create an account; ValueError says what is wrong with the name or password."""
    username = username.strip()
    if not username or len(username) > 64:
        raise ValueError("A username has 1 to 64 characters.")
    if len(password) < 8:
        raise ValueError("A password has at least 8 characters.")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise ValueError(f"User {username!r} exists already.")
    session.add(User(username=username, password_hash=hash_password(password)))
