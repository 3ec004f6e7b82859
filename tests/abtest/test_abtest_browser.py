"""The page's topic view in headless Chromium against an experiment server: pick a topic, see the arm's
feed, click an image, and find the click in the event log under the browser's cookie user."""

from __future__ import annotations

import sqlite3

import pytest

from conftest import single_torch_thread
from abtest_world import build_world, serve_in_thread
from interbert.serve.experiment import create_experiment_app
from interbert.serve.topics import Feed
from test_serve_browser import DevToolsPipe, chromium_or_skip


@pytest.fixture
def experiment(tmp_path):
    world = build_world(tmp_path / "world")
    events = tmp_path / "events.sqlite"
    app = create_experiment_app(world.arms(), (0.5, 0.5), "page", events)
    with single_torch_thread(), serve_in_thread(app) as url:
        yield url, world, events


def test_the_topic_view_shows_the_arms_feed_and_logs_a_click(experiment, tmp_path):
    url, world, events = experiment
    browser = DevToolsPipe(chromium_or_skip(), tmp_path / "chromium-profile")
    try:
        browser.open_page(url + "/")
        browser.wait_for("document.getElementById('topic-form').dataset.loaded === '1'")
        assert browser.evaluate("document.getElementById('topic-form').hidden") is False
        topic_id = browser.evaluate("document.getElementById('topic').options[1].value")
        browser.evaluate("const t = document.getElementById('topic'); t.value = t.options[1].value; "
                         "t.dispatchEvent(new Event('change'))")
        browser.wait_for("document.getElementById('results').dataset.state === 'done'")
        shown = browser.evaluate("[...document.querySelectorAll('#results figure.hit')].map(f => f.dataset.imageId)")
        request_id = browser.evaluate("document.getElementById('results').dataset.requestId")
        browser.evaluate("document.querySelectorAll('#results figure.hit')[1].click()")
        browser.wait_for("document.querySelectorAll('#results figure.hit')[1].dataset.clicked === '1'")
    finally:
        browser.close()
    with sqlite3.connect(events) as db:
        user, arm = db.execute("SELECT user_id, arm FROM impressions WHERE request_id = ?", (request_id,)).fetchone()
        clicks = db.execute("SELECT image_id FROM clicks WHERE request_id = ?", (request_id,)).fetchall()
    feed = Feed(world.feeds[("control", "treatment").index(arm)])
    assert shown == [item.image_id for item in feed.items[topic_id]]  # the browser's arm's ranking
    assert clicks == [(shown[1],)]
    assert len(user) == 32  # the id the server set as the page's cookie
