"""InterBERT: vision-and-language interaction for multimodal pretraining (Lin et al., 2020)."""

__version__ = "0.1.0"

__all__ = ["InterBertConfig", "preset", "__version__"]


def __getattr__(name: str):
    # Lazy: `interbert --help` and the light commands should not pay for importing torch/transformers.
    if name in ("InterBertConfig", "preset"):
        from interbert import config

        return getattr(config, name)
    raise AttributeError(f"module 'interbert' has no attribute {name!r}")
