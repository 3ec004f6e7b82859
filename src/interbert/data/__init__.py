"""The data layer: files -> typed examples -> masking/negatives -> padded batches.

- :mod:`~interbert.data.captions`: caption readers (Karpathy, COCO, Flickr8k/30k, JSON lines)
- :mod:`~interbert.data.features`: region-feature stores (TSV, npz, HDF5, LMDB, our own, WebDataset)
- :mod:`~interbert.data.tokenize`: WordPiece loading/training, Chinese word boundaries
- :mod:`~interbert.data.masking`: MSM spans and MRM region groups
- :mod:`~interbert.data.negatives`: TF-IDF / nearest-image hard negatives, ITM sampling
- :mod:`~interbert.data.batches`: region preparation, examples, collate, datasets
"""

from interbert.data.batches import PretrainingDataset, RetrievalDataset, collate, prepare_regions
from interbert.data.captions import Caption, read_captions
from interbert.data.errors import DataFormatError, UnknownImageError
from interbert.data.features import (
    FeatureStore,
    Regions,
    RegionStore,
    RegionStoreWriter,
    WebDatasetRegions,
    convert_features,
    open_features,
)

__all__ = [
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
    "WebDatasetRegions",
    "convert_features",
    "open_features",
    "read_captions",
]
