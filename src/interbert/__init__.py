"""InterBERT: vision-and-language interaction for multimodal pretraining (Lin et al., 2020).

The public names load on first use (PEP 562): ``import interbert`` imports neither torch nor
transformers, so ``interbert --help`` and the light commands stay fast. It does register InterBERT with
transformers' Auto classes, deferred (:mod:`interbert._auto`): when ``AutoConfig``, ``AutoTokenizer``,
``AutoModel`` or ``AutoProcessor`` is first imported, the InterBERT module that registers with it is
imported, so after ``import interbert`` they all load InterBERT folders (``model_type: interbert``).
"""

from interbert import _auto
from interbert._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "InterBertConfig": "config",
    "preset": "config",
    "InterBertModel": "modeling",
    "InterBertForPreTraining": "modeling",
    "InterBertForImageTextRetrieval": "modeling",
    "InterBertForMultipleChoice": "modeling",
    "InterBertForSequenceClassification": "modeling",
    "load_model": "loading",
    "InterBertProcessor": "processing",
}

__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
_auto.install()
