"""A/B experiment settings: the arms, their traffic split, and which arm a user sees.

Assignment is a pure function of (experiment salt, user id): sha256(salt + "\\0" + user id), its first
8 bytes read as an integer and divided by 2**64, is a number uniform in [0, 1); the arms own consecutive
slices of [0, 1) in the order they were given, sized by the split. So

- the same user always lands in the same arm (no state to lose, every server process agrees);
- another experiment (another salt) reshuffles users independently of this one, so a user who was in
  the treatment of the last experiment is not more likely to be in this one's treatment;
- the salt defaults to the experiment's name, so restarting the server keeps everyone where they were.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from interbert.errors import UsageError
from interbert.utils.files import file_sha256

ARM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_USER_ID_CHARS = 128


@dataclass(frozen=True)
class ArmSpec:
    """One arm as given on the command line: ``name=INDEX[,FEED]``."""

    name: str
    index: Path
    feed: Path | None = None
    model: Path | None = None  # default: the model the index was built with


def parse_arm(text: str) -> ArmSpec:
    """``control=runs/idx_a,runs/feed_a.sqlite`` -> ArmSpec('control', idx_a, feed_a)."""
    name, sep, paths = text.partition("=")
    if not sep or not paths:
        raise UsageError(f"--arm {text!r}: expected NAME=INDEX[,FEED]")
    if not ARM_NAME.match(name):
        raise UsageError(f"--arm {text!r}: the arm name must be 1-32 letters, digits, '_' or '-'")
    parts = paths.split(",")
    if len(parts) > 2 or not all(parts):
        raise UsageError(f"--arm {text!r}: expected NAME=INDEX[,FEED]")
    return ArmSpec(name, Path(parts[0]), Path(parts[1]) if len(parts) == 2 else None)


def parse_split(text: str | None, arms: int) -> tuple[float, ...]:
    """``"50/50"`` (or ``"90/10"``, ``"1/1/1"``) -> shares that sum to 1, one per arm; None = equal shares."""
    if text is None:
        return tuple(1 / arms for _ in range(arms))
    try:
        weights = [float(w) for w in text.split("/")]
    except ValueError:
        raise UsageError(f"--split {text!r}: expected numbers separated by '/', e.g. 50/50") from None
    if len(weights) != arms:
        raise UsageError(f"--split {text!r} has {len(weights)} shares for {arms} arms")
    if not all(w > 0 for w in weights) or not all(w < float("inf") for w in weights):  # also refuses nan
        raise UsageError(f"--split {text!r}: every share must be a positive number")
    total = sum(weights)
    return tuple(w / total for w in weights)


def hash_unit(salt: str, user_id: str) -> float:
    """A number in [0, 1), uniform over users and stable for one (salt, user)."""
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    digest = hashlib.sha256(f"{salt}\0{user_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_arm(user_id: str, salt: str, arms: tuple[str, ...], split: tuple[float, ...]) -> str:
    """The arm of ``user_id``: the one whose slice of [0, 1) holds the user's hash."""
    u = hash_unit(salt, user_id)
    upper = 0.0
    for arm, share in zip(arms, split):
        upper += share
        if u < upper:
            return arm
    return arms[-1]  # the shares' float sum may end a hair below 1


def index_sha256(folder: str | Path) -> str:
    """One hash of what an index folder serves: its manifest (index.json: model, engine, type, count)
    and its metadata (meta.sqlite: ids, captions, thumbnails, embeddings). The vectors file is derived
    from meta.sqlite's embeddings, so it is left out (it can be large and an engine may hold it elsewhere).
    The service opens meta.sqlite read-only, so its bytes do not change while it is served."""
    folder = Path(folder)
    # The hash of the two files' hashes: no content of one can pass for a part of the other.
    parts = (file_sha256(folder / name) for name in ("index.json", "meta.sqlite"))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def valid_user_id(user_id: str) -> bool:
    """Printable, at most MAX_USER_ID_CHARS characters: ids end up in the event log and in cookies."""
    return 0 < len(user_id) <= MAX_USER_ID_CHARS and user_id.isprintable()
