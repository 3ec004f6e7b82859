"""End to end: the server on localhost, the page in headless Chromium, a query typed into the search box.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL on file descriptors 3 and 4), so no websocket client or browser-automation package is
needed. Debian's ``chromium`` package is installed on first use when missing (root + apt-get, as on a
fresh CI machine); otherwise the test is skipped with the reason.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import minilm_vocab
from interbert.serve.index import build_index
from interbert.serve.service import create_app
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_or_skip() -> str:
    found = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed, and installing Debian's `chromium` needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    try:
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:  # a fresh machine may not have package lists yet
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=300)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("`apt-get install chromium` did not finish in time")
    found = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if result.returncode != 0 or not found:
        pytest.skip(f"`apt-get install chromium` failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return found


class DevToolsPipe:
    """Headless Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out)."""

    def __init__(self, binary: str, profile: Path):
        to_chrome, self._commands = os.pipe()
        self._replies, from_chrome = os.pipe()

        def place_pipes():  # in the child, before exec: the protocol's fixed descriptors
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--remote-debugging-pipe", "--window-size=1200,900", "about:blank"],
            pass_fds=(3, 4), preexec_fn=place_pipes, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._last_id, self.session = b"", 0, None

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._last_id:  # events and other replies are not needed here
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer {method} in {timeout} s")
            if select.select([self._replies], [], [], left)[0]:
                chunk = os.read(self._replies, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk

    def open_page(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression!r}")

    def type_and_press_enter(self, text: str) -> None:
        self.send("Input.insertText", text=text)
        self.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13, text="\r")
        self.send("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
            self.process.wait(timeout=10)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


@pytest.fixture
def server_url(tmp_path):
    import uvicorn

    vocab = minilm_vocab()
    write_gallery(tmp_path, num_images=12, feature_dim=16, seed=6)
    model = save_tiny_model(tmp_path / "model", vocab, 16)
    build_index(model, tmp_path / "features", tmp_path / "index", thumbnails=tmp_path / "images", progress=False)
    server = uvicorn.Server(uvicorn.Config(create_app(tmp_path / "index", model), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_typing_a_query_in_the_page_shows_result_images(server_url, tmp_path):
    from PIL import Image

    browser = DevToolsPipe(chromium_or_skip(), tmp_path / "chromium-profile")
    try:
        browser.open_page(server_url + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('query')")
        browser.evaluate("document.getElementById('query').focus()")
        browser.type_and_press_enter("a brown dog on the grass")
        browser.wait_for("document.getElementById('results').dataset.state === 'done'")
        loaded = browser.wait_for(
            "document.querySelectorAll('#results figure.hit img[data-loaded=\"1\"]').length === 12 && 12"
        )
        status = browser.evaluate("document.getElementById('status').textContent")
        # a plain search server has no topic feeds: the "browse a topic" menu stays out of sight
        topic_menu = browser.evaluate("getComputedStyle(document.getElementById('topic-form')).display")
        url = browser.evaluate("location.search")
        screenshot = tmp_path / "search.png"
        browser.screenshot(screenshot)
    finally:
        browser.close()
    assert loaded == 12
    assert status.startswith("12 results")
    assert topic_menu == "none"
    assert "q=a+brown+dog+on+the+grass" in url  # the search is linkable
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 800 and len(shot.convert("RGB").getcolors(1 << 20) or []) > 12  # a grid of colours


def test_the_api_page_renders_without_the_internet(server_url, tmp_path):
    """/docs is Swagger UI from the installed swagger-ui-bundle, not a CDN: the browser here has no internet,
    so the page renders the API's operations only if nothing it needs comes from elsewhere."""
    browser = DevToolsPipe(chromium_or_skip(), tmp_path / "chromium-profile")
    try:
        browser.open_page(server_url + "/docs")
        title = browser.wait_for("document.querySelector('.swagger-ui .info .title')?.textContent")
        operations = browser.wait_for("document.querySelectorAll('.swagger-ui .opblock').length")
        sources = browser.evaluate("[...document.scripts, ...document.querySelectorAll('link')]"
                                   ".map(e => e.src || e.href).join(' ')")
    finally:
        browser.close()
    assert title.startswith("interbert search")
    assert operations >= 3  # /search, /images/{image_id}, /health ... listed from /openapi.json
    assert "http" not in sources.replace(server_url, "")
