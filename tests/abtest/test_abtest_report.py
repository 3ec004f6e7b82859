"""The report's statistics against an independent computation on a fixed log, the SRM check, the CLI, the
arms' hashes, and files that are not logs (one error line each)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from scipy import stats

from interbert.cli import main as interbert_main
from interbert.serve.events import SCHEMA, ArmHashes, EventLog, ExperimentConfig
from interbert.serve.report import build_report

ITEMS = 5


def write_log(path, users_per_arm: dict[str, int], split=(0.5, 0.5), seed=0) -> dict[str, list[tuple[int, int]]]:
    """A log written straight to SQLite (one transaction: fast); returns each arm's per-user
    (impressions, clicks) as generated, for the independent computation."""
    rng = np.random.default_rng(seed)
    config = ExperimentConfig("fixed", "fixed", tuple(users_per_arm), split)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO experiment VALUES (?, ?)", config.as_rows().items())
    truth: dict[str, list[tuple[int, int]]] = {}
    clock = 1_700_000_000.0
    for arm_number, (arm, users) in enumerate(users_per_arm.items()):
        truth[arm] = []
        for u in range(users):
            propensity = rng.beta(1, 8) * (1.3 if arm_number else 1.0)  # users differ a lot: correlated clicks
            requests, clicks = int(rng.integers(1, 7)), 0
            for r in range(requests):
                request_id = f"{arm_number:02x}{u:08x}{r:022x}"
                clock += 1
                db.execute("INSERT INTO impressions VALUES (?, ?, ?, ?, 'topic', 't', NULL)",
                           (request_id, clock, f"{arm}-{u}", arm))
                db.executemany("INSERT INTO impression_items VALUES (?, ?, ?)",
                               [(request_id, p, f"img{p}") for p in range(1, ITEMS + 1)])
                for p in range(1, ITEMS + 1):
                    if rng.random() < min(1.0, propensity * 0.8 ** (p - 1)):
                        db.execute("INSERT INTO clicks (request_id, image_id, time) VALUES (?, ?, ?)",
                                   (request_id, f"img{p}", clock + 0.5))
                        clicks += 1
            truth[arm].append((requests * ITEMS, clicks))
    db.commit()
    db.close()
    return truth


def independent_difference(control: np.ndarray, treatment: np.ndarray):
    """Per-user linearisation of the ratio (written apart from the report's covariance form):
    each user contributes (c_u - R n_u) / mean(n); the ratio's variance is that sample's variance / m."""
    def ratio_and_variance(per_user):
        n, c = per_user[:, 0].astype(float), per_user[:, 1].astype(float)
        ratio = c.sum() / n.sum()
        linearised = (c - ratio * n) / n.mean()
        return ratio, linearised.var(ddof=1) / len(per_user)

    r_c, v_c = ratio_and_variance(control)
    r_t, v_t = ratio_and_variance(treatment)
    difference, se = r_t - r_c, np.sqrt(v_c + v_t)
    half = stats.norm.ppf(0.975) * se
    return difference, difference - half, difference + half, 2 * stats.norm.sf(abs(difference) / se)


@pytest.fixture(scope="module")
def fixed_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "events.sqlite"
    truth = write_log(path, {"control": 400, "treatment": 400})
    return path, truth


def test_counts_and_ctr_per_arm(fixed_log):
    path, truth = fixed_log
    report = build_report(path)
    for arm in report.arms:
        per_user = np.array(truth[arm.name])
        assert arm.users == len(per_user)
        assert (arm.impressions, arm.clicks) == tuple(per_user.sum(axis=0))
        assert arm.ctr == pytest.approx(per_user[:, 1].sum() / per_user[:, 0].sum())
        assert sum(shown for shown, _ in arm.ctr_by_position.values()) == arm.impressions
        assert sum(clicks for _, clicks in arm.ctr_by_position.values()) == arm.clicks
        # The fixed log's clicks decay with position; so must the report's CTR by position.
        assert arm.ctr_by_position[1][1] > arm.ctr_by_position[ITEMS][1]


def test_interval_and_p_value_agree_with_an_independent_computation(fixed_log):
    path, truth = fixed_log
    comparison = build_report(path).comparisons[0]
    difference, low, high, p_value = independent_difference(np.array(truth["control"]), np.array(truth["treatment"]))
    assert (comparison.arm, comparison.control) == ("treatment", "control")
    assert comparison.difference == pytest.approx(difference, rel=1e-9)
    assert (comparison.low, comparison.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert comparison.p_value == pytest.approx(p_value, rel=1e-7)


def test_the_delta_interval_matches_a_user_level_bootstrap(fixed_log):
    """The delta method is an approximation: a user-level bootstrap of the same log must give about the
    same interval (and an impression-level interval, which ignores the user correlation, a narrower one)."""
    path, truth = fixed_log
    comparison = build_report(path).comparisons[0]
    rng = np.random.default_rng(1)
    control, treatment = np.array(truth["control"]), np.array(truth["treatment"])

    def ctr(per_user):
        return per_user[:, 1].sum() / per_user[:, 0].sum()

    differences = [ctr(treatment[rng.integers(0, len(treatment), len(treatment))])
                   - ctr(control[rng.integers(0, len(control), len(control))]) for _ in range(2000)]
    low, high = np.percentile(differences, [2.5, 97.5])
    assert comparison.high - comparison.low == pytest.approx(high - low, rel=0.15)
    naive = 2 * 1.96 * np.sqrt(sum(ctr(a) * (1 - ctr(a)) / a[:, 0].sum() for a in (control, treatment)))
    assert naive < 0.9 * (comparison.high - comparison.low)


def test_a_skewed_log_is_flagged_as_sample_ratio_mismatch(tmp_path):
    skewed = tmp_path / "skewed.sqlite"
    write_log(skewed, {"control": 300, "treatment": 200})
    report = build_report(skewed)
    expected = stats.chisquare([300, 200], [250, 250])
    assert report.srm_chi2 == pytest.approx(expected.statistic) and report.srm_p == pytest.approx(expected.pvalue)
    assert report.srm_flagged
    # The same counts fit a 60/40 split.
    fitting = tmp_path / "fitting.sqlite"
    write_log(fitting, {"control": 300, "treatment": 200}, split=(0.6, 0.4))
    assert not build_report(fitting).srm_flagged


def test_the_cli_writes_markdown_and_a_png(tmp_path, capsys):
    log = tmp_path / "skewed.sqlite"
    write_log(log, {"control": 300, "treatment": 200})
    out = tmp_path / "report.md"
    assert interbert_main(["abtest", "report", str(log), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Sample-ratio mismatch" in text and "| treatment | control |" in text and "![" in text
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sample-ratio mismatch" in capsys.readouterr().err


def test_the_cli_refuses_a_missing_or_foreign_file(tmp_path, capsys):
    assert interbert_main(["abtest", "report", str(tmp_path / "none.sqlite")]) == 2
    foreign = tmp_path / "foreign.sqlite"
    foreign.write_bytes(b"not a database at all" * 100)
    assert interbert_main(["abtest", "report", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_an_sqlite_file_without_the_logs_tables_is_one_line(tmp_path, capsys):
    no_impressions = tmp_path / "no_impressions.sqlite"
    with sqlite3.connect(no_impressions) as db:
        db.execute("CREATE TABLE experiment (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.executemany("INSERT INTO experiment VALUES (?, ?)",
                       ExperimentConfig("x", "x", ("a", "b"), (0.5, 0.5)).as_rows().items())
    assert interbert_main(["abtest", "report", str(no_impressions)]) == 2
    line = one_error_line(capsys)
    assert str(no_impressions) in line and "impressions" in line
    other = tmp_path / "other.sqlite"  # some other application's database
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    assert interbert_main(["abtest", "report", str(other)]) == 2
    assert str(other) in one_error_line(capsys)
    empty_rows = tmp_path / "garbled.sqlite"  # the tables, but an experiment table that holds no experiment
    with sqlite3.connect(empty_rows) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO experiment VALUES ('name', 'x')")
    assert interbert_main(["abtest", "report", str(empty_rows)]) == 2
    assert str(empty_rows) in one_error_line(capsys)


def test_a_directory_or_a_damaged_log_is_one_line(tmp_path, capsys):
    assert interbert_main(["abtest", "report", str(tmp_path)]) == 2
    assert str(tmp_path) in one_error_line(capsys)
    log = tmp_path / "events.sqlite"
    write_log(log, {"control": 300, "treatment": 300})
    data = bytearray(log.read_bytes())
    page = 4096
    for start in range(2 * page, len(data) - page, 3 * page):  # scribble over pages past the schema's
        data[start + 8:start + 200] = b"\xff" * 192
    log.write_bytes(bytes(data))
    code = interbert_main(["abtest", "report", str(log), "--out", str(tmp_path / "r.md")])
    assert code in (1, 2)
    assert str(log) in one_error_line(capsys)
    assert not (tmp_path / "r.md").exists()


def test_the_report_prints_each_arms_hashes(tmp_path, capsys):
    log = tmp_path / "events.sqlite"
    hashes = {"control": ArmHashes("/m/a", "a" * 64, "b" * 64, "c" * 64),
              "treatment": ArmHashes("/m/b", "d" * 64, "e" * 64, None)}
    EventLog(log, ExperimentConfig("bound", "bound", ("control", "treatment"), (0.5, 0.5)), hashes).close()
    assert interbert_main(["abtest", "report", str(log)]) == 0
    out = capsys.readouterr().out
    assert f"| control | /m/a | {'a' * 64} | {'b' * 64} | {'c' * 64} |" in out
    assert f"| treatment | /m/b | {'d' * 64} | {'e' * 64} | no feed |" in out
    assert build_report(log).arm_hashes == hashes
    old = tmp_path / "old.sqlite"  # written before hashes were recorded
    write_log(old, {"control": 3, "treatment": 3})
    assert interbert_main(["abtest", "report", str(old)]) == 0
    assert "Not recorded" in capsys.readouterr().out


def write_through_the_store(events, users_per_arm: dict[str, int], seed=0) -> dict[str, list[tuple[int, int]]]:
    """The same events into any engine, through the store's own interface (as the service writes them);
    returns each arm's per-user (impressions, clicks) as generated."""
    from interbert.serve.events import open_event_store

    rng = np.random.default_rng(seed)
    config = ExperimentConfig("parity", "parity", tuple(users_per_arm), (0.5, 0.5))
    hashes = {arm: ArmHashes(f"/m/{arm}", "a" * 64, "b" * 64, None) for arm in users_per_arm}
    store = open_event_store(events, config, hashes)
    truth: dict[str, list[tuple[int, int]]] = {}
    try:
        for arm_number, (arm, users) in enumerate(users_per_arm.items()):
            truth[arm] = []
            for u in range(users):
                propensity, clicks = rng.beta(1, 6) * (1.4 if arm_number else 1.0), 0
                requests = int(rng.integers(1, 4))
                for _ in range(requests):
                    request_id = store.log_impression(f"{arm}-{u}", arm, "topic", [f"img{p}" for p in range(ITEMS)],
                                                      topic_id="t")
                    for p in range(ITEMS):
                        if rng.random() < min(1.0, propensity * 0.8 ** p):
                            clicks += store.log_click(request_id, f"img{p}", f"{arm}-{u}")[0]
                            assert not store.log_click(request_id, f"img{p}", f"{arm}-{u}")[0]  # counted once
                truth[arm].append((requests * ITEMS, clicks))
    finally:
        store.close()
    return truth


def test_both_engines_give_the_same_report_of_the_same_events(tmp_path, postgres_uri, capsys):
    """The per-user sums come from each database's GROUP BY: the numbers must be the same, to the last
    bit, and equal to the events as generated; `abtest report postgresql://...` prints the same Markdown."""
    users = {"control": 120, "treatment": 120}
    truth = write_through_the_store(tmp_path / "events.sqlite", users)
    assert write_through_the_store(postgres_uri, users) == truth
    reports = [build_report(tmp_path / "events.sqlite"), build_report(postgres_uri)]

    def numbers(report):
        arms = [(a.name, a.users, a.requests, a.impressions, a.clicks, a.ctr, a.ctr_se, a.ctr_by_position,
                 a.per_user.tolist()) for a in report.arms]
        comparisons = [(c.difference, c.low, c.high, c.p_value, c.relative) for c in report.comparisons]
        return arms, comparisons, report.srm_chi2, report.srm_p, report.arm_hashes

    assert numbers(reports[0]) == numbers(reports[1])
    for arm in reports[1].arms:
        per_user = np.array(truth[arm.name])
        assert arm.users == users[arm.name]
        assert (arm.impressions, arm.clicks) == tuple(per_user.sum(axis=0))
        assert sorted(map(tuple, arm.per_user.tolist())) == sorted(truth[arm.name])
    # one timeline point per request here (fewer than TIMELINE_POINTS), ending at the arm's CTR
    for report in reports:
        for arm in report.arms:
            times, cumulative = report.timeline[arm.name]
            assert len(times) == arm.requests and cumulative[-1] == pytest.approx(arm.ctr)
    for name, log in (("sqlite", str(tmp_path / "events.sqlite")), ("postgres", postgres_uri)):
        (tmp_path / name).mkdir()
        assert interbert_main(["abtest", "report", log, "--out", str(tmp_path / name / "report.md")]) == 0
    capsys.readouterr()
    assert (tmp_path / "sqlite" / "report.md").read_text() == (tmp_path / "postgres" / "report.md").read_text()
    assert (tmp_path / "postgres" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_the_timeline_keeps_a_bounded_number_of_points(tmp_path, monkeypatch):
    """The report holds the users and TIMELINE_POINTS per arm, not a row per request."""
    from interbert.serve import report as report_module

    path = tmp_path / "events.sqlite"
    write_log(path, {"control": 200, "treatment": 200})
    full = build_report(path)
    monkeypatch.setattr(report_module, "TIMELINE_POINTS", 50)
    thin = build_report(path)
    for arm in full.arms:
        (times, cumulative), (thin_times, thin_cumulative) = full.timeline[arm.name], thin.timeline[arm.name]
        assert len(times) == arm.requests > 100 and len(thin_times) <= 51
        assert thin_times[-1] == times[-1] and thin_cumulative[-1] == cumulative[-1] == pytest.approx(arm.ctr)
        assert set(thin_times) <= set(times)  # the same curve, fewer points
