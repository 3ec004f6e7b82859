"""Arm assignment: sticky per user, independent across experiments, and splitting users as configured."""

from __future__ import annotations

import hashlib
import math

import pytest

from interbert.errors import UsageError
from interbert.serve.abtest import assign_arm, hash_unit, parse_arm, parse_split

USERS = [f"user-{n}" for n in range(10_000)]
ARMS = ("control", "treatment")


def within_binomial_bound(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """|count - np| within 4.5 standard deviations: a correct split fails this about once in 150,000 runs."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_the_same_user_always_gets_the_same_arm():
    first = [assign_arm(u, "exp1", ARMS, (0.5, 0.5)) for u in USERS[:2000]]
    again = [assign_arm(u, "exp1", ARMS, (0.5, 0.5)) for u in USERS[:2000]]
    assert first == again
    # The hash is fixed by the design (sha256 of salt, NUL, user id), not by anything in this process:
    # a restarted server or a second worker must agree, so it is recomputed here from its definition.
    digest = hashlib.sha256(b"exp1\x00user-0").hexdigest()
    assert hash_unit("exp1", "user-0") == int(digest[:16], 16) / 2**64


@pytest.mark.parametrize("split", [(0.5, 0.5), (0.9, 0.1), (0.2, 0.3, 0.5)])
def test_the_split_matches_the_setting_within_a_binomial_bound(split):
    arms = ARMS if len(split) == 2 else ("a", "b", "c")
    assigned = [assign_arm(u, "exp1", arms, split) for u in USERS]
    for arm, share in zip(arms, split):
        assert within_binomial_bound(assigned.count(arm), len(USERS), share), (arm, assigned.count(arm))


def test_a_skewed_assignment_would_fail_the_bound():
    # The bound (+-225 users at 50/50) catches a real bug: 52.5% instead of 50% over 10,000 users.
    assert not within_binomial_bound(5250, 10_000, 0.5)
    assert within_binomial_bound(5200, 10_000, 0.5)


def test_another_experiment_reshuffles_users_independently():
    one = [assign_arm(u, "exp1", ARMS, (0.5, 0.5)) == "treatment" for u in USERS]
    two = [assign_arm(u, "exp2", ARMS, (0.5, 0.5)) == "treatment" for u in USERS]
    both = sum(a and b for a, b in zip(one, two))
    assert within_binomial_bound(both, len(USERS), 0.25)  # independent: a quarter are treated in both


def test_hash_units_are_uniform():
    units = sorted(hash_unit("salt", u) for u in USERS)
    assert 0 <= units[0] and units[-1] < 1
    # Kolmogorov-Smirnov distance to the uniform distribution; 1.95/sqrt(n) is its 0.1% critical value.
    distance = max(max((i + 1) / len(units) - u, u - i / len(units)) for i, u in enumerate(units))
    assert distance < 1.95 / math.sqrt(len(units))


def test_arm_and_split_parsing():
    arm = parse_arm("treatment=runs/idx_b,runs/feed_b.sqlite")
    assert (arm.name, str(arm.index), str(arm.feed)) == ("treatment", "runs/idx_b", "runs/feed_b.sqlite")
    assert parse_arm("control=idx").feed is None
    assert parse_split("90/10", 2) == (0.9, 0.1)
    assert parse_split(None, 4) == (0.25,) * 4
    for bad in ("control", "=idx", "control=", "con trol=idx", "control=a,b,c", "control=a,"):
        with pytest.raises(UsageError):
            parse_arm(bad)
    for bad in ("50/50/0", "50", "fifty/50", "50/nan", "-1/2"):
        with pytest.raises(UsageError):
            parse_split(bad, 2 if bad != "50/50/0" else 3)
