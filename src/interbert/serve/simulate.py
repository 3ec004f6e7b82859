"""Simulated users for an experiment served on this machine (``interbert abtest simulate``).

Ground truth comes from the built-in benchmark (``interbert data synth`` writes every scene's objects, with
kind, colour and size, to ``scenes.jsonl``). A topic title names attributes ("a red ball", "large cubes",
"红色的球"); an image truly matches the topic when one of its objects has every attribute the title names.

Each user has a few topics of interest and a personal click propensity (some users click more than
others, which is why the report's statistics are over users). On a feed the user follows the
position-based click model: position p is looked at with probability
``examine_decay ** (p - 1)``; a looked-at item is clicked with probability ``propensity * click_relevant``
when it matches the topic and ``propensity * click_irrelevant`` otherwise. An arm that ranks matching
images higher therefore earns more clicks, which is what the experiment is meant to detect.

Traffic is bounded (``max_requests``, ``max_seconds``) and goes only to this machine: the simulator
refuses any other host, so it cannot be pointed at a production service by mistake.

Each simulated user names itself with ``X-User-Id`` on its feeds and its clicks: signed with the server's
secret when it is given (``--user-secret-file``, as the server's), else a plain id, which only a server
started with ``--insecure-user-ids`` accepts.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np

from interbert.errors import DataError, UsageError
from interbert.serve.identity import sign_user_id
from interbert.synthetic.language import EN_PLURAL, EN_SIZE_WORDS, ZH_COLOUR, ZH_KIND, ZH_SIZE
from interbert.synthetic.scenes import COLOURS, KINDS, SIZES

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEFAULT_EXAMINE_DECAY = 0.75
DEFAULT_CLICK_RELEVANT = 0.5
DEFAULT_CLICK_IRRELEVANT = 0.03


@dataclass(frozen=True)
class Want:
    """The attributes a topic title names (None = any)."""

    kind: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: dict) -> bool:
        return all(value is None or obj[key] == value
                   for key, value in (("kind", self.kind), ("colour", self.colour), ("size", self.size)))

    @property
    def empty(self) -> bool:
        return self.kind is None and self.colour is None and self.size is None


def _lexicon() -> dict[str, tuple[str, str]]:
    """word -> (attribute, value), English synonyms and plurals and the Chinese words."""
    words: dict[str, tuple[str, str]] = {}
    for kind in KINDS:
        words[kind] = words[EN_PLURAL[kind]] = words[ZH_KIND[kind]] = ("kind", kind)
    for colour in COLOURS:
        words[colour] = words[ZH_COLOUR[colour]] = ("colour", colour)
    for size in SIZES:
        for table in EN_SIZE_WORDS:
            words[table[size]] = ("size", size)
    return words


LEXICON = _lexicon()


def parse_topic(title: str) -> Want:
    """The attributes named in ``title`` (English words or Chinese characters of the benchmark)."""
    found: dict[str, str] = {}
    lowered = title.lower()
    for word in lowered.replace(",", " ").split():
        if word in LEXICON:
            attribute, value = LEXICON[word]
            found.setdefault(attribute, value)
    if not found:  # Chinese titles have no spaces: look for the words inside the text, longest first
        for word in sorted((w for w in LEXICON if not w.isascii()), key=len, reverse=True):
            if word in title:
                attribute, value = LEXICON[word]
                found.setdefault(attribute, value)
        for size, word in ZH_SIZE.items():  # one-character size words count only as "大球" or "大的"
            if any(word + after in title for after in (*ZH_KIND.values(), "的")) and "size" not in found:
                found["size"] = size
    return Want(**found)


def read_scenes(data: str | Path, split: str | None = None) -> dict[str, list[dict]]:
    """image id -> objects, from a benchmark folder (``synth.json`` names its scenes file) or a scenes.jsonl;
    only the scenes of ``split`` (train/val/test) when given."""
    data = Path(data)
    if data.is_dir():
        manifest = data / "synth.json"
        if not manifest.is_file():
            raise UsageError(f"{data} is not a benchmark folder from `interbert data synth` (no synth.json)")
        data = data / json.loads(manifest.read_text())["files"]["scenes"]
    if not data.is_file():
        raise UsageError(f"{data}: no such scenes file")
    scenes = {}
    for number, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            if split is None or record["split"] == split:
                scenes[str(record["image_id"])] = record["objects"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{data}:{number}: not a scene record ({error})") from None
    if not scenes:
        raise DataError(f"{data}: no scenes" + (f" of split {split!r}" if split else ""))
    return scenes


def benchmark_topics(scenes: dict[str, list[dict]], count: int, lang: str = "en", seed: int = 0) -> list[str]:
    """Titles "<colour> <kind>" for the combinations the gallery holds most often (each matching several
    images, so a good ranking has something to find), ``count`` at most."""
    tally: dict[tuple[str, str], int] = {}
    for objects in scenes.values():
        for pair in {(o["colour"], o["kind"]) for o in objects}:
            tally[pair] = tally.get(pair, 0) + 1
    rng = np.random.default_rng(seed)
    pairs = sorted(tally, key=lambda p: (-tally[p], rng.random()))[:count]
    if lang == "zh":
        return [f"{ZH_COLOUR[colour]}的{ZH_KIND[kind]}" for colour, kind in pairs]
    return [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {kind}" for colour, kind in pairs]


class HttpError(DataError):
    """An answer other than 2xx; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class LocalClient:
    """JSON over one kept-alive HTTP connection (the standard library's http.client: the simulator needs
    no HTTP package at run time). An answer other than 2xx raises DataError naming the request."""

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.url = url
        self._connection = connection(parts.hostname, parts.port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        payload = json.dumps(body).encode() if body is not None else None
        headers = {**(headers or {}), **({"Content-Type": "application/json"} if payload else {})}
        for attempt in (1, 2):
            try:
                self._connection.request(method, path, body=payload, headers=headers)
                response = self._connection.getresponse()
                data = response.read()
                break
            except ConnectionRefusedError:
                raise UsageError(f"nothing answers at {self.url}: start `interbert serve --arm ...` first") from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closed an idle kept-alive connection: reconnect once. Repeating is safe even
                # for a click, which the server counts once per request and item.
                self._connection.close()
                if attempt == 2:
                    raise
        if not 200 <= response.status < 300:
            raise HttpError(f"{method} {self.url}{path}: HTTP {response.status} "
                            f"{data[:300].decode(errors='replace')}", response.status)
        return json.loads(data)

    def close(self) -> None:
        self._connection.close()


def check_local(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise UsageError(f"--url {url!r}: the simulator only sends traffic to this machine "
                         f"(http://127.0.0.1:PORT or http://localhost:PORT)")
    return url.rstrip("/")


@dataclass
class SimulationResult:
    requests: int = 0
    clicks: int = 0  # acknowledged and counted
    rate_limited: int = 0  # clicks the server refused with 429 (its per-user or per-request click limit)
    seconds: float = 0.0
    by_arm: dict[str, dict[str, int]] = field(default_factory=dict)
    acknowledged: list[tuple[str, str]] = field(default_factory=list)  # (request_id, image_id)


def check_settings(users: int, max_requests: int, max_seconds: float, **probabilities: float) -> None:
    if users < 1 or max_requests < 1 or not max_seconds > 0:
        raise UsageError("--users and --max-requests must be >= 1 and --max-seconds > 0")
    for name, p in probabilities.items():
        if not 0 <= p <= 1:
            raise UsageError(f"{name} must lie in [0, 1], got {p}")


def click_through(client: "LocalClient", answer: dict, relevant: list[bool], who: dict, rng: np.random.Generator,
                  result: "SimulationResult", arm: dict, examine_decay: float, p_relevant: float,
                  p_irrelevant: float) -> None:
    """One user's look down one answer: position p is examined with probability ``examine_decay ** (p - 1)``,
    an examined item clicked with ``p_relevant`` or ``p_irrelevant`` (capped at 1); each click is sent, and
    counted in ``result`` and ``arm`` once the server acknowledges it."""
    for item, is_relevant in zip(answer["results"], relevant):
        if rng.random() >= examine_decay ** (item["position"] - 1):
            continue  # never looked at
        if rng.random() < min(1.0, p_relevant if is_relevant else p_irrelevant):
            try:
                ack = client.request("POST", "/events/click", {"request_id": answer["request_id"],
                                                                "image_id": item["image_id"]}, headers=who)
            except HttpError as error:
                if error.status != 429:
                    raise
                # Over the server's click limit: a person's click would be lost too; the run goes on
                # and says how many were (raise the server's --user-clicks-per-minute for few users).
                result.rate_limited += 1
                continue
            if ack["counted"]:
                result.clicks += 1
                arm["clicks"] += 1
                result.acknowledged.append((answer["request_id"], item["image_id"]))


def simulate(url: str, users: int, data: str | Path, max_requests: int = 1000, max_seconds: float = 60.0,
             seed: int = 0, k: int = 10, examine_decay: float = DEFAULT_EXAMINE_DECAY,
             click_relevant: float = DEFAULT_CLICK_RELEVANT, click_irrelevant: float = DEFAULT_CLICK_IRRELEVANT,
             interests_per_user: int = 2, timeout: float = 30.0, user_secret: bytes | None = None) -> SimulationResult:
    base = check_local(url)
    check_settings(users, max_requests, max_seconds, examine_decay=examine_decay, click_relevant=click_relevant,
                   click_irrelevant=click_irrelevant)
    scenes = read_scenes(data)
    rng = np.random.default_rng(seed)
    result = SimulationResult()
    started = time.monotonic()
    client = LocalClient(base, timeout)
    try:
        topics = client.request("GET", "/topics")
        wants = {t["topic_id"]: parse_topic(t["title"]) for t in topics}
        usable = [t["topic_id"] for t in topics if not wants[t["topic_id"]].empty]
        if not usable:
            raise UsageError(f"{base} offers no topic whose title names a benchmark kind, colour or size "
                             f"({len(topics)} topics): the simulated users would have nothing to look for")
        # Users are fixed up front from the seed: the same seed replays the same population.
        population = [
            (f"sim{seed}-{n}", rng.choice(usable, size=min(interests_per_user, len(usable)), replace=False),
             float(rng.uniform(0.5, 1.5)))
            for n in range(users)
        ]
        while result.requests < max_requests and time.monotonic() - started < max_seconds:
            user_id, interests, propensity = population[result.requests % users]
            topic_id = str(rng.choice(interests))
            # The same id on the feed and on its clicks: the server counts a click only from the user it served.
            who = {"X-User-Id": sign_user_id(user_id, user_secret) if user_secret is not None else user_id}
            answer = client.request("GET", f"/topics/{quote(topic_id, safe='')}?k={k}", headers=who)
            result.requests += 1
            arm = result.by_arm.setdefault(answer["arm"], {"requests": 0, "clicks": 0})
            arm["requests"] += 1
            relevant = [any(wants[topic_id].matches(o) for o in scenes.get(item["image_id"], ()))
                        for item in answer["results"]]
            click_through(client, answer, relevant, who, rng, result, arm, examine_decay,
                          propensity * click_relevant, propensity * click_irrelevant)
    finally:
        client.close()
    result.seconds = time.monotonic() - started
    return result
