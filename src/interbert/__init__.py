"""InterBERT: vision-and-language interaction for multimodal pretraining (Lin et al., 2020).

The public names load on first use (PEP 562): ``import interbert`` imports neither torch nor
transformers, so ``interbert --help`` and the light commands stay fast. Reaching a model class or
``load_model`` imports :mod:`interbert.modeling`, which registers InterBERT with transformers' Auto
classes; from then on ``AutoModel.from_pretrained(folder)`` loads InterBERT folders.
"""

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
}

__all__ = [*_EXPORTS, "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
