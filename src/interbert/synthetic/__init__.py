"""The built-in generated benchmark (``interbert data synth``).

Scenes of a few coloured objects, rendered to small pictures, with a *simulated* detector's region
features, captions (English or Chinese) whose test split holds twin images that only binding words to
regions can tell apart, VCR-format questions and a GLUE-format caption pair task — all in the file
formats real data sets use, so the same commands run on Flickr30K.
"""

from interbert.synthetic.benchmark import FORMATS, MANIFEST, SynthSettings, generate

__all__ = ["FORMATS", "MANIFEST", "SynthSettings", "generate"]
