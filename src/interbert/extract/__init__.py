"""Region features from the user's own images: ``interbert extract IMAGES OUT``.

A torchvision Faster R-CNN (ResNet-50 FPN) with weights from a local file detects regions in every
image and keeps, per image, the top ones after non-maximum suppression, with the box head's pooled
1024-d feature, the class distribution and the box in original-image pixels; ``--boxes`` pools
features for given boxes (COCO annotations, VCR metadata) instead. Output goes into the project's
feature store (and, on request, the bottom-up-attention TSV layout).

The detector and image decoding are the library's (:mod:`interbert.detection`, which the processor's
``images=`` runs too); this package is the command: its run loop, given boxes and writers, and the old
``interbert.extract.detector`` / ``images`` / ``in_memory`` names, re-exported.

Only :mod:`interbert.extract.command` is imported by the CLI; it loads torch/torchvision lazily, so
``interbert --help`` works in an environment without torchvision (the ``[extract]`` extra).
"""

from interbert.extract.command import register

__all__ = ["register"]
