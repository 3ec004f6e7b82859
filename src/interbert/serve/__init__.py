"""Text-to-image search: an image index (``index``), the HTTP service and web page (``service``,
``page.html``) and their CLI (``cli``). Kept import-light: ``interbert --help`` must not load FAISS or
torch, so the heavy modules are imported where they are used.

    from interbert.serve.index import build_index, ImageIndex
    from interbert.serve.service import create_app
"""

from interbert.data import DEFAULT_MAX_REGIONS  # noqa: F401  (defined in the library; importable from here still)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
# Seconds a re-ranked search may wait for a free re-rank slot before the service answers 503.
# A short wait absorbs a burst (a re-rank takes ~0.1 s on the tiny model); past it the caller is told to retry.
DEFAULT_RERANK_QUEUE_TIMEOUT = 1.0
# Bounds on each HTTP connection (interbert.serve.server): seconds to send a request's head, then its body
# (a body is a few KiB at most), and open connections plus running requests (past it: 503). The limit stays
# well under the usual 1024 open files of a process, which also needs descriptors for its own files.
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_LIMIT_CONCURRENCY = 512
# Seconds a stopping server (SIGTERM) lets its in-flight requests finish before it cancels them: far more
# than a re-ranked search takes, less than the 30 s+ an orchestrator usually allows before SIGKILL.
DEFAULT_SHUTDOWN_TIMEOUT_S = 25.0
