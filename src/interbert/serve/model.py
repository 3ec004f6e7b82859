"""The model as search sees it: text embeddings, image embeddings, and (image, text) pair scores.

Candidates come from the single-modal embeddings (``InterBertModel.embed_text``/``embed_images``);
re-ranking uses the cross-modal matching score: a retrieval fine-tuned checkpoint's logit, or the
pretraining ITM head's margin ``match - mismatch`` (the "zero-shot" scorer).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import torch

from interbert.config import InterBertConfig
from interbert.loading import FINGERPRINTED_WEIGHTS, load_model, weights_fingerprint  # noqa: F401
from interbert.modeling import InterBertForImageTextRetrieval, fuse
from interbert.retrieval import pair_scorer
from interbert.serve._data import load_tokenizer
from interbert.static_scoring import StaticPairScorer, doubling_edges

# weights_fingerprint lives with the model folder's other files (interbert.loading); imported here by index and service
WEIGHT_FILES = FINGERPRINTED_WEIGHTS
MAX_QUERY_TOKENS = 64


class SearchModel:
    """Loads a checkpoint once; every method is inference-only and safe to call from worker threads.

    With one intra-op thread (what ``interbert serve`` sets) forwards of concurrent requests run side by
    side, one per core. With more, each forward already spreads over the cores, so forwards take turns:
    overlapping OpenMP teams oversubscribe the cores and every barrier waits for a descheduled thread."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", need_tokenizer: bool = True, compile: str = "off",
                 max_regions: int | None = None, rerank_batch: int = 64):
        self.model_dir = Path(model_dir)
        # a fine-tuned retrieval scorer, or a pretraining folder's ITM head
        self.model = load_model(self.model_dir, task="scoring").to(device).eval()
        self.architecture = type(self.model).__name__
        self.config: InterBertConfig = self.model.config
        self.device = device
        self.tokenizer = load_tokenizer(self.model_dir) if need_tokenizer else None
        self.max_query_tokens = min(MAX_QUERY_TOKENS, self.config.max_position_embeddings)
        self._lock = threading.Lock()
        self.static_scorer = None if compile == "off" else self._static_scorer(compile, max_regions, rerank_batch)

    def _static_scorer(self, compile: str, max_regions: int | None, rerank_batch: int) -> StaticPairScorer:
        """``serve --compile``: the re-rank on bucketed shapes through torch.compile: candidates padded to
        doubling counts up to ``rerank_batch`` (the service's chunk), the query to doubling token counts, region
        lists to doubling counts up to the index's ``max_regions``. A few dozen graphs at most, each compiled by
        the first query that needs it."""
        return StaticPairScorer(
            self.model.interbert, pair_scorer(self.model), compile=compile, row_edges=doubling_edges(rerank_batch),
            text_edges=doubling_edges(self.max_query_tokens),
            region_edges=doubling_edges(max_regions) if max_regions else None)

    def _turn(self):
        return self._lock if torch.get_num_threads() > 1 else contextlib.nullcontext()

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_size or self.config.pooled_size

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this SearchModel was loaded without a tokenizer")
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_query_tokens, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    @torch.inference_mode()
    def embed_images(self, region_batch: dict[str, torch.Tensor]) -> np.ndarray:
        with self._turn():
            vectors = self.model.interbert.embed_images(**self._to_device(region_batch))
        return vectors.float().cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        text = self._to_device(self.tokenize(texts))
        with self._turn():
            vectors = self.model.interbert.embed_text(text["input_ids"], text["attention_mask"])
        return vectors.float().cpu().numpy()

    @torch.inference_mode()
    def pair_scores(self, text: str, region_batch: dict[str, torch.Tensor]) -> np.ndarray:
        """One matching score per image of ``region_batch`` against ``text`` (higher = better match)."""
        encoded = self.tokenize([text])
        n = region_batch["region_features"].shape[0]
        inputs = self._to_device({
            "input_ids": encoded["input_ids"].expand(n, -1),
            "attention_mask": encoded["attention_mask"].expand(n, -1),
            **region_batch,
        })
        with self._turn():
            if self.static_scorer is not None:
                scores = self.static_scorer(*self.model.interbert.embed_inputs(**inputs))
            elif isinstance(self.model, InterBertForImageTextRetrieval):
                scores = self.model(**inputs).logits
            else:
                # The pretraining model's own forward would also run the MSM/MRM heads over every position.
                base = self.model.interbert(**inputs)
                itm = self.model.itm_classifier(fuse(base.text_pooled, base.image_pooled, self.config.fusion))
                scores = itm[:, 1] - itm[:, 0]
        return scores.float().cpu().numpy()
