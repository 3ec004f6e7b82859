"""``interbert abtest report LOG``: the experiment's numbers, read from its event log (an SQLite file or a
PostgreSQL URI).

Memory for the users, not the events: the database sums each (arm, user)'s items shown and clicks with
GROUP BY (the same SQL on both engines), and the timeline is streamed in time order and kept at
:data:`TIMELINE_POINTS` points per arm. The per-user rows are sorted here (not by ORDER BY: the engines'
text collations differ), so both engines hand the statistics the same numbers in the same order.

Metric: CTR = clicks / items shown (each item of each answered request is one impression; a click is
counted once per request and item). CTR by position divides the clicks at a position by the items shown
there.

Statistics over users. Users, not impressions, are the unit of randomisation, and the clicks of one user
are correlated (a keen user clicks often), so treating impressions as independent would make the
interval too narrow. An arm's CTR is the ratio of two per-user sums, R = sum(c_u) / sum(n_u) (c_u clicks,
n_u impressions of user u); its variance comes from the delta method for a ratio of means over the m
users of the arm:

    Var(R) ~= (s_c^2 - 2 R s_cn + R^2 s_n^2) / (m * nbar^2)

with s_c^2, s_n^2, s_cn the sample variances and covariance (ddof=1) of c_u and n_u and nbar the mean
n_u. Arms are independent, so the difference D = R_t - R_c has Var(D) = Var(R_t) + Var(R_c); the 95%
interval is D +- 1.96 sqrt(Var(D)) and the two-sided p-value 2 (1 - Phi(|D| / sqrt(Var(D)))). (The
normal approximation wants a few hundred users per arm.)

Sample-ratio mismatch: a chi-square goodness-of-fit test of the users per arm against the configured
split. A p-value below 0.001 means the assignment or the logging is broken (e.g. one arm's answers fail
more often and go unlogged) and no metric of the experiment should be trusted until it is explained.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from interbert.errors import DataError
from interbert.serve.events import REPORT_TIMEOUT_S, ArmHashes, open_log, read_errors, read_failure
from interbert.utils.files import atomic_path, atomic_write_text

TIMELINE_POINTS = 2000  # per arm: the plot's resolution, whatever the number of requests
SRM_ALPHA = 0.001  # the usual threshold: SRM checks run on every experiment, so false alarms must be rare
CONFIDENCE = 0.95


@dataclass
class ArmStats:
    name: str
    share: float  # configured
    users: int
    requests: int
    impressions: int
    clicks: int
    ctr: float
    ctr_se: float  # delta method over users
    ctr_by_position: dict[int, tuple[int, int]]  # position -> (impressions, clicks)
    per_user: np.ndarray = field(repr=False)  # (m, 2): impressions, clicks of each user


@dataclass
class Comparison:
    arm: str
    control: str
    difference: float  # CTR(arm) - CTR(control)
    low: float
    high: float
    p_value: float
    relative: float  # difference / CTR(control)


@dataclass
class Report:
    experiment: str
    arms: list[ArmStats]
    comparisons: list[Comparison]
    srm_chi2: float
    srm_p: float
    srm_flagged: bool
    timeline: dict[str, tuple[np.ndarray, np.ndarray]]  # arm -> (impression times, cumulative CTR)
    arm_hashes: dict[str, ArmHashes] = field(default_factory=dict)  # empty: a log from before they were recorded


def ratio_se(per_user: np.ndarray) -> float:
    """Standard error of sum(clicks) / sum(impressions) over users, by the delta method (nan for < 2 users)."""
    m = len(per_user)
    if m < 2:
        return math.nan
    n, c = per_user[:, 0].astype(float), per_user[:, 1].astype(float)
    ratio = c.sum() / n.sum()
    cov = np.cov(c, n, ddof=1)  # [[s_c^2, s_cn], [s_cn, s_n^2]]
    variance = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (m * n.mean() ** 2)
    return math.sqrt(max(variance, 0.0))


def compare(treatment: ArmStats, control: ArmStats) -> Comparison:
    difference = treatment.ctr - control.ctr
    se = math.hypot(treatment.ctr_se, control.ctr_se)
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    if math.isnan(se) or math.isnan(difference):  # too few users or no impressions: nothing to test
        p_value = math.nan
    elif se > 0:
        p_value = float(2 * stats.norm.sf(abs(difference) / se))
    else:  # no variation at all between users: any difference is exact
        p_value = 1.0 if difference == 0 else 0.0
    relative = difference / control.ctr if control.ctr > 0 else math.nan
    return Comparison(treatment.name, control.name, difference, difference - z * se, difference + z * se, p_value,
                      relative)


def sample_ratio_check(users: list[int], split: tuple[float, ...]) -> tuple[float, float]:
    """(chi-square, p-value) of the users per arm against the configured shares."""
    total = sum(users)
    if total == 0:
        return math.nan, math.nan
    result = stats.chisquare(users, f_exp=[total * share for share in split])
    return float(result.statistic), float(result.pvalue)


def build_report(log_path: str | Path, timeout: float = REPORT_TIMEOUT_S) -> Report:
    """The report of an event log; a PostgreSQL store that does not answer within ``timeout`` seconds is a
    DataError, as a lost connection is."""
    db, config, arm_hashes = open_log(log_path, timeout)
    try:
        counts = _read_counts(db, config)
    except read_errors() as error:  # a damaged page found while reading, a lost connection: no report
        raise DataError(f"{log_path}: cannot read the event log ({read_failure(db, error)})") from None
    finally:
        db.close()
    return _compute(config, arm_hashes, *counts)


def _read_counts(db, config):
    """What the statistics need, counted by the database (SQLite or PostgreSQL, the same SQL): per (arm,
    user) items shown and clicks, requests per arm, items shown and clicked per (arm, position), and the
    timeline: per request its time, items and clicks, thinned to TIMELINE_POINTS per arm."""
    shown = sorted(db.execute(
        "SELECT i.arm, i.user_id, COUNT(*) FROM impressions i JOIN impression_items it USING (request_id) "
        "GROUP BY i.arm, i.user_id").fetchall())
    clicked = dict(((arm, user), count) for arm, user, count in db.execute(
        "SELECT i.arm, i.user_id, COUNT(*) FROM clicks c JOIN impressions i USING (request_id) "
        "GROUP BY i.arm, i.user_id"))
    requests = dict(db.execute("SELECT arm, COUNT(*) FROM impressions GROUP BY arm").fetchall())
    by_position: dict[str, dict[int, list[int]]] = {arm: {} for arm in config.arms}
    for arm, position, count in db.execute(
            "SELECT i.arm, it.position, COUNT(*) FROM impressions i JOIN impression_items it USING (request_id) "
            "GROUP BY i.arm, it.position"):
        by_position.setdefault(arm, {}).setdefault(position, [0, 0])[0] = count
    for arm, position, count in db.execute(
            "SELECT i.arm, it.position, COUNT(*) FROM clicks c JOIN impression_items it USING (request_id, image_id) "
            "JOIN impressions i USING (request_id) GROUP BY i.arm, it.position"):
        by_position.setdefault(arm, {}).setdefault(position, [0, 0])[1] = count
    timeline_rows = _timeline(db, requests)
    return shown, clicked, requests, by_position, timeline_rows


def _timeline(db, requests: dict[str, int]) -> list[tuple[str, float, int, int]]:
    """Per request (time order): arm, time, items and clicks cumulated over the arm so far, kept for every
    ``step``-th request of the arm and its last, so the rows held are TIMELINE_POINTS per arm, not one per
    request. Streamed: a server-side cursor on PostgreSQL (psycopg would fetch every row at once)."""
    step = {arm: max(1, math.ceil(count / TIMELINE_POINTS)) for arm, count in requests.items()}
    sql = ("SELECT i.arm, i.time, (SELECT COUNT(*) FROM impression_items it WHERE it.request_id = i.request_id), "
           "(SELECT COUNT(*) FROM clicks c WHERE c.request_id = i.request_id) FROM impressions i "
           "ORDER BY i.time, i.request_id")
    cursor = db.cursor() if isinstance(db, sqlite3.Connection) else db.cursor(name="interbert_timeline")
    kept: list[tuple[str, float, int, int]] = []
    seen: dict[str, list[int]] = {}  # arm -> [requests, items, clicks] so far
    try:
        cursor.execute(sql)
        for arm, when, items, clicks in cursor:
            so_far = seen.setdefault(arm, [0, 0, 0])
            so_far[0] += 1
            so_far[1] += items
            so_far[2] += clicks
            if so_far[0] % step.get(arm, 1) == 0 or so_far[0] == requests.get(arm, 0):
                kept.append((arm, float(when), so_far[1], so_far[2]))
    finally:
        cursor.close()
    return kept


def _compute(config, arm_hashes: dict[str, ArmHashes], shown, clicked, requests, by_position, timeline_rows) -> Report:
    users: dict[str, list[tuple[int, int]]] = {arm: [] for arm in config.arms}
    for arm, user, count in shown:
        users.setdefault(arm, []).append((count, clicked.get((arm, user), 0)))
    arms = []
    for name, share in zip(config.arms, config.split):
        per_user = np.array(users[name], dtype=np.int64).reshape(-1, 2)
        impressions, clicks = int(per_user[:, 0].sum()), int(per_user[:, 1].sum())
        arms.append(ArmStats(
            name, share, len(per_user), requests.get(name, 0), impressions, clicks,
            clicks / impressions if impressions else math.nan, ratio_se(per_user),
            {p: (v[0], v[1]) for p, v in sorted(by_position[name].items())}, per_user,
        ))
    control = arms[0]
    comparisons = [compare(arm, control) for arm in arms[1:]]
    chi2, srm_p = sample_ratio_check([a.users for a in arms], config.split)

    timeline = {}
    for arm in config.arms:
        rows = [(t, n, c) for a, t, n, c in timeline_rows if a == arm]  # cumulated already (see _timeline)
        if rows:
            times, items, clicks = (np.array(col, dtype=float) for col in zip(*rows))
            timeline[arm] = (times, clicks / np.maximum(items, 1))
    return Report(config.name, arms, comparisons, chi2, srm_p, bool(srm_p < SRM_ALPHA), timeline, arm_hashes)


def _pct(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.{digits}f}%"


def render_markdown(report: Report, plot_name: str | None) -> str:
    lines = [f"# A/B test report: {report.experiment}", ""]
    if report.srm_flagged:
        lines += [f"**Sample-ratio mismatch**: the users per arm do not fit the configured split "
                  f"(chi-square {report.srm_chi2:.2f}, p = {report.srm_p:.2g} < {SRM_ALPHA}). The assignment or "
                  f"the logging is broken; do not read the metrics below until this is explained.", ""]
    lines += ["| arm | share | users | requests | impressions | clicks | CTR | 95% CI |",
              "|---|---|---|---|---|---|---|---|"]
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    for a in report.arms:
        ci = "n/a" if math.isnan(a.ctr_se) else f"[{_pct(a.ctr - z * a.ctr_se)}, {_pct(a.ctr + z * a.ctr_se)}]"
        lines.append(f"| {a.name} | {100 * a.share:g}% | {a.users} | {a.requests} | {a.impressions} | {a.clicks} | "
                     f"{_pct(a.ctr)} | {ci} |")
    lines += ["", "## Treatment vs control", "",
              "| arm | vs | CTR difference | 95% CI | relative | p-value |", "|---|---|---|---|---|---|"]
    for c in report.comparisons:
        lines.append(f"| {c.arm} | {c.control} | {_pct(c.difference, 3)} | [{_pct(c.low, 3)}, {_pct(c.high, 3)}] | "
                     f"{_pct(c.relative, 1)} | {'n/a' if math.isnan(c.p_value) else f'{c.p_value:.3g}'} |")
    lines += ["", "Intervals and p-values are computed over users (delta method for the ratio of per-user sums; "
                  "see `interbert.serve.report`).", "",
              f"Sample-ratio check: chi-square {report.srm_chi2:.3f}, p = {report.srm_p:.3g} "
              f"({'MISMATCH' if report.srm_flagged else 'no mismatch'} at {SRM_ALPHA}).", "",
              "## CTR by position", ""]
    positions = sorted({p for a in report.arms for p in a.ctr_by_position})
    lines += ["| position | " + " | ".join(a.name for a in report.arms) + " |",
              "|---|" + "---|" * len(report.arms)]
    for p in positions:
        cells = []
        for a in report.arms:
            shown, clicks = a.ctr_by_position.get(p, (0, 0))
            cells.append(f"{_pct(clicks / shown) if shown else 'n/a'} ({clicks}/{shown})")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", *_arm_hashes_section(report)]
    if plot_name:
        lines += ["", f"![CTR per arm and over time]({plot_name})"]
    return "\n".join(lines) + "\n"


def _arm_hashes_section(report: Report) -> list[str]:
    """What each arm served: the hashes the log bound it to at the experiment's first start."""
    lines = ["## Arms' models", ""]
    if not report.arm_hashes:
        return lines + ["Not recorded: this log was written before arms' hashes were recorded (the next "
                        "`interbert serve` on it records them)."]
    lines += ["| arm | model | weights sha256 | index sha256 | feed sha256 |", "|---|---|---|---|---|"]
    for arm in report.arms:
        h = report.arm_hashes.get(arm.name)
        if h is None:
            lines.append(f"| {arm.name} | not recorded | | | |")
        else:
            lines.append(f"| {arm.name} | {h.model} | {h.weights_sha256} | {h.index_sha256} | "
                         f"{h.feed_sha256 or 'no feed'} |")
    return lines


def plot(report: Report, path: str | Path) -> None:
    """CTR per arm with its 95% interval, and cumulative CTR over the experiment's time, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [a.name for a in report.arms]
    ctrs = [100 * a.ctr for a in report.arms]
    errors = [0 if math.isnan(a.ctr_se) else 100 * z * a.ctr_se for a in report.arms]
    left.bar(names, ctrs, yerr=errors, capsize=6, color=["#888888"] + ["#3572b0"] * (len(names) - 1))
    left.set_ylabel("CTR (%)")
    left.set_title("CTR per arm (95% CI over users)")
    start = min((times[0] for times, _ in report.timeline.values()), default=0.0)
    end = max((times[-1] for times, _ in report.timeline.values()), default=0.0)
    scale, unit = (3600, "hours") if end - start > 3 * 3600 else (60, "minutes") if end - start > 180 else (1, "seconds")
    for arm, (times, cumulative) in report.timeline.items():
        right.plot((times - start) / scale, 100 * cumulative, label=arm)
    right.set_xlabel(f"{unit} since the first impression")
    right.set_ylabel("cumulative CTR (%)")
    right.set_title("Cumulative CTR over time")
    right.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def write_report(log_path: str | Path, out: str | Path | None, plot_path: str | Path,
                 timeout: float = REPORT_TIMEOUT_S) -> tuple[Report, str]:
    report = build_report(log_path, timeout)
    plot(report, plot_path)
    plot_name = str(Path(plot_path).name if out and Path(plot_path).parent == Path(out).parent else plot_path)
    markdown = render_markdown(report, plot_name)
    if out:
        atomic_write_text(out, markdown)
    return report, markdown
