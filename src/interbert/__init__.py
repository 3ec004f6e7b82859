"""InterBERT: vision-and-language interaction for multimodal pretraining (Lin et al., 2020)."""

from interbert.config import InterBertConfig, preset

__version__ = "0.1.0"

__all__ = ["InterBertConfig", "preset", "__version__"]
