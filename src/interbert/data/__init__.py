"""The data layer: files -> typed examples -> masking/negatives -> padded batches.

- :mod:`~interbert.data.captions`: caption readers (Karpathy, COCO, Flickr8k/30k, LAVIS/ALBEF lists, JSON lines)
- :mod:`~interbert.data.features`: region-feature stores (TSV, npz, HDF5, LMDB, our own)
- :mod:`~interbert.data.tokenize`: WordPiece loading/training, Chinese word boundaries
- :mod:`~interbert.data.masking`: MSM spans and MRM region groups
- :mod:`~interbert.data.negatives`: TF-IDF / nearest-image hard negatives, ITM sampling
- :mod:`~interbert.data.batches`: region preparation, examples, collate, datasets
"""

from collections.abc import Mapping

from interbert._lazy import lazy_exports

# A batch holds the keyword arguments of the model's forward, and under this one key the bookkeeping
# that is no model input (which image and caption each row is, the VCR task of each row). The training
# loop and the evaluators pass every other key to forward, so a key the model does not take fails
# there by name instead of being dropped silently.
META = "meta"
# Regions per image, the global one included (the paper's 36): what the processor pads to and what a search
# index keeps. Defined here, in the light data package, so the processor (library) and the service (an
# application, re-exporting it as interbert.serve.DEFAULT_MAX_REGIONS) share one value without the library
# importing the application.
DEFAULT_MAX_REGIONS = 36


def model_inputs(batch: Mapping) -> dict:
    """The batch without its bookkeeping: what ``model(**inputs)`` takes."""
    return {key: value for key, value in batch.items() if key != META}


# Names re-exported here, by the module that defines them. They load on first use (PEP 562), so that
# importing a light sub-module (the CLI's argument parsers, interbert.data.errors) does not pull in torch.
_EXPORTS = {
    "PretrainingDataset": "batches", "RetrievalDataset": "batches", "collate": "batches", "prepare_regions": "batches",
    "Caption": "captions", "read_captions": "captions",
    "DataFormatError": "errors", "UnknownImageError": "errors",
    "FeatureStore": "features", "Regions": "features", "RegionStore": "features", "RegionStoreWriter": "features",
    "convert_features": "features", "open_features": "features",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "META",
    "DEFAULT_MAX_REGIONS",
    "model_inputs",
    "Caption",
    "PretrainingDataset",
    "RetrievalDataset",
    "collate",
    "prepare_regions",
    "DataFormatError",
    "FeatureStore",
    "RegionStore",
    "RegionStoreWriter",
    "Regions",
    "UnknownImageError",
    "convert_features",
    "open_features",
    "read_captions",
]
