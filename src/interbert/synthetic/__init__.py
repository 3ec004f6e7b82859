"""The built-in generated benchmark (``interbert data synth``).

Scenes of a few coloured objects, rendered to small pictures, with a *simulated* detector's region
features, captions (English or Chinese) whose test split holds twin images that only binding words to
regions can tell apart, VCR-format questions and a GLUE-format caption pair task — all in the file
formats real data sets use, so the same commands run on Flickr30K.
"""

import importlib

__all__ = ["FORMATS", "MANIFEST", "SynthSettings", "generate"]


def __getattr__(name: str):  # PEP 562: the generator (numpy, PIL, torch) loads on first use, not with the CLI
    if name not in __all__:
        raise AttributeError(f"module 'interbert.synthetic' has no attribute {name!r}")
    return getattr(importlib.import_module("interbert.synthetic.benchmark"), name)
