"""PostgreSQL event stores that cannot be used, at `serve --arm` start and in `abtest report` (issue 24):
a wrong password, an unknown role, a database that does not exist, a role without permission on the
schema, a store of a newer schema. Each is one `error:` line naming the URI, never the password, against
a real server (tests/helpers/postgres_server.py), and nothing is written."""

from __future__ import annotations

import psycopg
import pytest

from abtest_world import build_world
from interbert.cli import main as interbert_main
from interbert.serve import cli as serve_cli
from interbert.serve.events import SCHEMA_VERSION, ExperimentConfig, open_event_store
from postgres_server import SUPERUSER

PASSWORD = "the-right-Secret-42"
WRONG = "a-wrong-Secret-17"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(autouse=True)
def never_serve(monkeypatch):
    """A start that passes every check would serve for ever: fail the test instead."""
    def started(app, args):
        raise AssertionError("the service started")

    monkeypatch.setattr(serve_cli, "_run", started)


def as_superuser(server, sql: str, database: str = "postgres") -> None:
    with psycopg.connect(server.uri(database), autocommit=True) as db:
        db.execute(sql)


def uri_of(server, user: str, database: str) -> str:
    return f"postgresql://{user}@127.0.0.1:{server.port}/{database}"


def refused(world, capsys, uri: str, *command: str) -> str:
    """The one line `serve --arm ... --events URI` (or ``command``) prints, after checking its exit code 2."""
    argv = list(command) or ["serve", *world.arm_flags(), "--events", uri, "--experiment", "refused"]
    assert interbert_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert uri in errors[0] and PASSWORD not in errors[0] and WRONG not in errors[0]
    return errors[0]


def test_a_wrong_password_is_one_line_that_does_not_print_it(world, postgres_server, capsys, monkeypatch):
    as_superuser(postgres_server, f"CREATE ROLE pwuser LOGIN PASSWORD '{PASSWORD}'")
    postgres_server.require_password("pwuser")
    uri = uri_of(postgres_server, "pwuser", "postgres")
    monkeypatch.setenv("PGPASSWORD", WRONG)
    assert "password authentication failed" in refused(world, capsys, uri)
    assert "password authentication failed" in refused(world, capsys, uri, "abtest", "report", uri)
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")  # no ~/.pgpass of the machine either
    assert "password" in refused(world, capsys, uri)


def test_an_unknown_role_is_one_line(world, postgres_server, capsys):
    uri = uri_of(postgres_server, "nobody_here", "postgres")
    assert 'role "nobody_here" does not exist' in refused(world, capsys, uri)
    assert 'role "nobody_here" does not exist' in refused(world, capsys, uri, "abtest", "report", uri)


def test_a_database_that_does_not_exist_is_one_line(world, postgres_server, capsys):
    uri = uri_of(postgres_server, SUPERUSER, "no_such_database")
    assert 'database "no_such_database" does not exist' in refused(world, capsys, uri)
    assert 'database "no_such_database" does not exist' in refused(world, capsys, uri, "abtest", "report", uri)


def test_a_role_without_permission_on_the_schema_is_one_line_writing_nothing(world, postgres_server, postgres_uri,
                                                                           capsys):
    database = postgres_uri.rsplit("/", 1)[1]
    as_superuser(postgres_server, "CREATE ROLE reader LOGIN")
    as_superuser(postgres_server, "REVOKE CREATE ON SCHEMA public FROM PUBLIC", database)
    uri = uri_of(postgres_server, "reader", database)
    line = refused(world, capsys, uri)
    assert "permission denied for schema public" in line and "CREATE" in line
    with psycopg.connect(postgres_uri) as db:  # nothing was created
        assert db.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                          ).fetchone() == (0,)
    # a store the role may not read: the report says so in one line
    open_event_store(postgres_uri, ExperimentConfig("e", "e", ("a", "b"), (0.5, 0.5))).close()
    as_superuser(postgres_server, "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC", database)
    assert "permission denied" in refused(world, capsys, uri, "abtest", "report", uri)


def test_a_store_of_a_newer_schema_is_one_line_naming_both_versions(world, postgres_uri, capsys):
    open_event_store(postgres_uri, ExperimentConfig("refused", "refused", ("control", "treatment"), (0.5, 0.5))).close()
    with psycopg.connect(postgres_uri, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    line = refused(world, capsys, postgres_uri)
    assert f"schema version {SCHEMA_VERSION + 1}" in line and f"({SCHEMA_VERSION})" in line
    assert "newer than this interbert" in refused(world, capsys, postgres_uri, "abtest", "report", postgres_uri)


def test_a_server_that_hangs_after_accepting_is_one_line_within_a_bound(world, capsys, monkeypatch, tmp_path):
    """SIGSTOPped right after the connection is made (connecting was bounded already, by connect_timeout):
    the start's check and `abtest report`, while opening the store and while counting its events, each end in
    one line within their bound instead of waiting for ever. Its own server (pausing the session's would hang
    other tests)."""
    import time

    from interbert.serve import events_pg
    from interbert.serve import report as report_module
    from postgres_server import PostgresServer

    database = PostgresServer()
    try:
        uri = database.create_database("hangs")
        open_event_store(uri, ExperimentConfig("refused", "refused", ("control", "treatment"), (0.5, 0.5))).close()

        def hanging_first(module, name):
            """``module.name`` that hangs the server the first time it is called, after the connection is made."""
            real, calls = getattr(module, name), []

            def hangs(*args, **kwargs):
                if not calls:
                    calls.append(1)
                    database.pause()
                return real(*args, **kwargs)

            monkeypatch.setattr(module, name, hangs)

        def bounded(*command: str, code: int = 2) -> tuple[str, float]:
            started = time.monotonic()
            try:
                if code == 2:
                    line = refused(world, capsys, uri, *command)
                else:  # a store that fails while it is read: a data error (exit 1), one line too
                    assert interbert_main(list(command)) == code
                    err = capsys.readouterr().err.strip().splitlines()
                    assert len(err) == 1 and err[0].startswith("error:"), err
                    line = err[0]
            finally:
                took = time.monotonic() - started
                database.resume()
                monkeypatch.undo()
            return line, took

        monkeypatch.setattr(events_pg, "CHECK_TIMEOUT_S", 2.0)
        hanging_first(events_pg, "_read_experiment")
        line, took = bounded()  # serve --arm ... --events URI: the start's check
        assert "cannot open the event store" in line and "did not answer within 2 s" in line and took < 10, (line, took)

        hanging_first(events_pg, "_read_experiment")
        line, took = bounded("abtest", "report", uri, "--timeout", "2")  # the report, opening
        assert "cannot read the event store" in line and "did not answer within 2 s" in line and took < 10, (line, took)
        assert "--timeout" in line

        hanging_first(report_module, "_read_counts")
        line, took = bounded("abtest", "report", uri, "--timeout", "2", code=1)  # the report, counting
        assert "cannot read the event log" in line and "did not answer within 2 s" in line and took < 10, (line, took)
        # the server is well again: the same report answers
        assert interbert_main(["abtest", "report", uri, "--timeout", "2", "--plot", str(tmp_path / "r.png")]) == 0
    finally:
        database.resume()
        database.close()
