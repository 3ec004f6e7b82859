"""Optional dependencies (pyproject's extras) and the one-line error when one is missing.

The core install trains, evaluates and runs the demo's models; a few commands need more:
``[serve]`` for ``interbert index|serve`` (and the demo's search index), ``[extract]`` for
``interbert extract``, ``[zh]`` for Chinese word segmentation, ``[milvus]`` for an index searched by
Milvus (``--engine milvus...``), ``[postgres]`` for an A/B event store in PostgreSQL (``--events
postgresql://...``), ``[parquet]`` for ``interbert embed --format parquet``, ``[export]`` for ``interbert export onnx``, ``[wandb]`` and ``[mlflow]`` for ``train.report_to: [wandb]`` / ``[mlflow]``. Without them, the command stops with
``error: ... pip install 'interbert[serve]'`` (the CLI's usage-error path, exit 2) instead of an
ImportError traceback. ``tests/packaging/test_packaging.py`` keeps :data:`EXTRA_MODULES` in step with pyproject.
"""

from __future__ import annotations

import importlib.util

from interbert.errors import UsageError

# extra -> the top-level modules it provides (import names, not distribution names: faiss-cpu -> faiss)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "pydantic", "uvicorn", "faiss", "prometheus_client", "swagger_ui_bundle"),
    "extract": ("torchvision",),
    "zh": ("jieba",),
    "milvus": ("pymilvus", "milvus_lite"),
    "postgres": ("psycopg",),
    "parquet": ("pyarrow",),
    "export": ("onnx", "onnxruntime", "onnxscript"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),  # mlflow-skinny, and what its SQLite store needs
}

_EXTRA_OF_MODULE = {module: extra for extra, modules in EXTRA_MODULES.items() for module in modules}


class MissingExtraError(UsageError):
    """An optional dependency that the asked-for command needs is not installed."""

    def __init__(self, extra: str, module: str, needed_by: str | None = None, hint: str | None = None):
        self.extra, self.module = extra, module
        who = needed_by or "this command"
        super().__init__(f"{who} needs {module}, which is not installed: pip install 'interbert[{extra}]'"
                         + (f" ({hint})" if hint else ""))


def extra_for_missing_module(error: BaseException, needed_by: str | None = None) -> MissingExtraError | None:
    """The :class:`MissingExtraError` for an import that failed because an extra is not installed, else None
    (a missing core dependency or a broken install stays a bug with its traceback)."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    top = error.name.partition(".")[0]
    extra = _EXTRA_OF_MODULE.get(top)
    return None if extra is None else MissingExtraError(extra, top, needed_by)


def require_extra(extra: str, needed_by: str) -> None:
    """Stop before any work is done when ``extra`` is not installed (for commands that would otherwise
    fail only at their last step, e.g. the demo's search index after an hour of training)."""
    for module in EXTRA_MODULES[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(extra, module, needed_by)
