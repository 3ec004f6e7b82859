"""InterBERT's registration with transformers' Auto classes, made when those classes are first imported.

``import interbert`` must stay light (no torch, no transformers: the CLI starts fast), yet after it
``AutoConfig`` / ``AutoTokenizer`` / ``AutoModel`` / ``AutoProcessor.from_pretrained(folder)`` must know
``model_type: interbert``. transformers has no plug-in entry point for that, so :func:`install` puts a finder
on ``sys.meta_path`` that waits for transformers' Auto modules: once one of them has been executed, the
InterBERT module that registers with it is imported (each registers itself at its end). Importing
``transformers`` alone, or a tokenizer class, loads no Auto module and so nothing of InterBERT's.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# transformers' Auto module -> the InterBERT module that registers with it when imported
REGISTERS_WITH = {
    "transformers.models.auto.configuration_auto": "interbert.config",  # AutoConfig (AutoTokenizer reads it)
    "transformers.models.auto.tokenization_auto": "interbert.tokenization",  # AutoTokenizer: BERT's WordPiece
    "transformers.models.auto.modeling_auto": "interbert.modeling",  # AutoModel, AutoModelForPreTraining, ...
    "transformers.models.auto.processing_auto": "interbert.processing",  # AutoProcessor
}


class _RegisteringLoader(importlib.abc.Loader):
    """The Auto module's own loader, then the import of the InterBERT module that registers with it."""

    def __init__(self, loader: importlib.abc.Loader, then: str):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        # The Auto module is complete here. If the InterBERT module is the one importing it (interbert.config
        # does `from transformers import AutoConfig`), import_module returns that module as it stands and
        # the module registers at its own end.
        importlib.import_module(self.then)


class _AutoRegistration(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        then = REGISTERS_WITH.get(name)
        if then is None:
            return None
        for finder in sys.meta_path:  # the spec the import system would find without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, then)
                return spec
        return None


def install() -> None:
    """Register now with the Auto modules already imported, and with the others when they are."""
    if any(isinstance(finder, _AutoRegistration) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _AutoRegistration())
    for auto_module, then in REGISTERS_WITH.items():
        if auto_module in sys.modules:
            importlib.import_module(then)
