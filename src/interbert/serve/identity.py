"""Who a request of an A/B experiment comes from, and how many clicks it may send.

A user id is only believed when the server signed it: the token is ``<id>.<sig>``, where ``sig`` is the
hex HMAC-SHA256 of the id under the server's secret. The service hands a new browser such a token as its
``interbert_user`` cookie; a front end that holds the same secret may name its own users by sending
``sign_user_id(id, secret)`` as ``X-User-Id`` or ``?user=``. Without the signature anyone could log
impressions or clicks as anyone else and so move an experiment's result.

``--insecure-user-ids`` (local tests and simulation only) also accepts a plain id from ``X-User-Id`` or
``?user=``.

Clicks are rate-limited per user and per request (token buckets, in this process): a script that holds
one valid id still cannot pour clicks into the log faster than a person clicks.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path

from interbert.errors import UsageError

MIN_SECRET_BYTES = 32  # what `openssl rand -hex 16` writes; shorter secrets can be guessed offline
SIGNATURE_CHARS = 64  # hex sha256
SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_DOMAIN = b"interbert-user-id\0"  # keeps these signatures apart from anything else signed with the same secret

# Click limits: a person does not click more than about one item a second for long, nor click most of
# one feed. A bucket holds this many clicks and refills at this many per minute.
DEFAULT_USER_CLICKS_PER_MINUTE = 60
DEFAULT_REQUEST_CLICKS_PER_MINUTE = 30
MAX_TRACKED_KEYS = 100_000  # buckets kept in memory; the least recently used are dropped beyond this


def sign_user_id(user_id: str, secret: bytes) -> str:
    """The token that names ``user_id`` to a server holding ``secret``: ``<id>.<hex hmac>``."""
    return f"{user_id}.{_signature(user_id, secret)}"


def _signature(user_id: str, secret: bytes) -> str:
    return hmac.new(secret, _DOMAIN + user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def looks_signed(token: str) -> bool:
    """Whether ``token`` has the form of a signed id (whatever the signature's worth)."""
    user_id, dot, signature = token.rpartition(".")
    return bool(dot and user_id and SIGNATURE.match(signature))


def verify_user_token(token: str, secret: bytes) -> str | None:
    """The id a signed token names, or None when it is unsigned or signed with another secret."""
    if not looks_signed(token):
        return None
    user_id, _, signature = token.rpartition(".")
    return user_id if hmac.compare_digest(signature, _signature(user_id, secret)) else None


def read_secret_file(path: str | Path) -> bytes:
    """The secret in ``path`` (surrounding whitespace dropped). Refused, with one line naming the file,
    when it is missing, shorter than MIN_SECRET_BYTES, or readable by anyone but its owner."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"--user-secret-file {path}: not a regular file")
        secret = path.read_bytes().strip()
    except OSError as error:
        raise UsageError(f"--user-secret-file {path}: cannot read it ({error.strerror or error})") from None
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Whoever can read the secret can sign any user id: the file must be the owner's alone.
        raise UsageError(f"--user-secret-file {path}: readable or writable by group or others "
                         f"(mode {stat.S_IMODE(info.st_mode):o}); run `chmod 600 {path}`")
    if len(secret) < MIN_SECRET_BYTES:
        raise UsageError(f"--user-secret-file {path}: the secret has {len(secret)} bytes, at least "
                         f"{MIN_SECRET_BYTES} are needed (e.g. `openssl rand -hex 32 > {path}`)")
    return secret


def random_secret() -> bytes:
    return secrets.token_bytes(MIN_SECRET_BYTES)


class Refused(Exception):
    """A user id that is not believed: ``status`` 401 (unsigned) or 403 (signed with another secret)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class UserIds:
    """Turns what a request says about its user into a user id the service believes."""

    def __init__(self, secret: bytes, insecure: bool = False):
        self._secret = secret
        self.insecure = insecure

    def sign(self, user_id: str) -> str:
        return sign_user_id(user_id, self._secret)

    def from_cookie(self, token: str) -> str | None:
        """The id of a cookie this server signed, else None. A cookie that does not verify (the server
        restarted with a new per-process secret, or it was forged) is not an error: the browser is
        treated as new and gets a fresh id, so the page keeps working."""
        return verify_user_token(token, self._secret)

    def from_given(self, token: str, where: str) -> str:
        """The id named by ``X-User-Id`` or ``?user=`` (``where`` says which); raises Refused."""
        user_id = verify_user_token(token, self._secret)
        if user_id is not None:
            return user_id
        if self.insecure:
            return token  # --insecure-user-ids: a plain id is taken at its word
        if looks_signed(token):
            raise Refused(403, f"{where}: the user id's signature does not match this server's secret")
        raise Refused(401, f"{where}: the user id must be signed by this server (`<id>.<hmac>`, see "
                           f"--user-secret-file); plain ids are accepted only with --insecure-user-ids")


class TokenBuckets:
    """One token bucket per key (a user id, a request id): ``capacity`` clicks at once, refilled at
    ``capacity`` per ``period`` seconds. Used from the event loop and, to be safe, behind a lock."""

    def __init__(self, capacity: int, period: float = 60.0, max_keys: int = MAX_TRACKED_KEYS):
        if capacity < 1:
            raise UsageError(f"a click limit must be >= 1 per minute, got {capacity}")
        self.capacity, self.rate, self.max_keys = float(capacity), capacity / period, max_keys
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token for ``key``: 0.0 when there was one, else the seconds until there will be."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1 if tokens >= 1 else tokens, now)  # most recently used last
            while len(self._buckets) > self.max_keys:
                # Forgetting the least recently used key only gives it a full bucket again: memory stays
                # bounded whatever number of ids a client invents.
                self._buckets.popitem(last=False)
            return wait


def retry_after(wait: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))
