"""InterBERT configuration: a transformers ``PretrainedConfig`` plus named presets.

The text path (embeddings, single-stream layers, text-stream layers) uses BERT's field names
(``hidden_size``, ``num_attention_heads``, ``intermediate_size``, ...) so that a BERT checkpoint's
config maps onto it directly. The image stream has its own heads and intermediate size; it shares
``hidden_size`` with the text path because the single-stream module attends over [regions ; text]
in one sequence.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

FUSIONS = ("mul", "sum")
ITM_NEGATIVES = ("data", "in_batch")
ITM_INPUTS = ("masked", "clean")
MSM_PAIRS = ("all", "matched")
MRM_TARGETS = ("classes", "features")


class InterBertConfig(PretrainedConfig):
    model_type = "interbert"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        num_single_stream_layers: int = 6,
        num_text_stream_layers: int = 6,
        num_image_stream_layers: int = 6,
        image_num_attention_heads: int = 8,
        image_intermediate_size: int = 3072,
        region_feature_size: int = 2048,
        num_region_classes: int = 1601,
        pooled_size: int = 1024,
        fusion: str = "mul",
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        image_hidden_dropout_prob: float = 0.1,
        image_attention_probs_dropout_prob: float = 0.1,
        itm_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        msm_loss_weight: float = 1.0,
        mrm_loss_weight: float = 1.0,
        mrm_target: str = "classes",
        itm_loss_weight: float = 1.0,
        embedding_size: int = 0,
        itc_loss_weight: float = 0.0,
        itc_temperature: float = 0.07,
        itm_negatives: str = "data",
        itm_negative_ratio: float = 0.5,
        itm_inputs: str = "masked",
        msm_pairs: str = "all",
        pad_token_id: int = 0,
        **kwargs,
    ):
        """Every field as a keyword with its default, as transformers' configs take them. Long because it
        is one line per field of the config and nothing else."""
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_single_stream_layers = num_single_stream_layers
        self.num_text_stream_layers = num_text_stream_layers
        self.num_image_stream_layers = num_image_stream_layers
        self.image_num_attention_heads = image_num_attention_heads
        self.image_intermediate_size = image_intermediate_size
        self.region_feature_size = region_feature_size
        self.num_region_classes = num_region_classes
        self.pooled_size = pooled_size
        self.fusion = fusion
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.image_hidden_dropout_prob = image_hidden_dropout_prob
        self.image_attention_probs_dropout_prob = image_attention_probs_dropout_prob
        self.itm_dropout_prob = itm_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        # Weights of the pretraining objectives in InterBertForPreTraining's total loss.
        self.msm_loss_weight = msm_loss_weight
        self.mrm_loss_weight = mrm_loss_weight
        self.itm_loss_weight = itm_loss_weight
        # What InterBertForPreTraining predicts for a masked region: "classes" - the detector's class
        # distribution (KL, the paper), "features" - the region's features (regression, for feature
        # stores without class distributions). Only that decoder is built: a decoder no loss trains
        # would leave DistributedDataParallel waiting for its gradient.
        self.mrm_target = mrm_target
        # Single-modal embeddings for fast candidate search (text-only / regions-only passes, pooled and
        # projected to `embedding_size`; 0 = use the pooled outputs as they are) and the optional
        # in-batch contrastive (ITC) loss that trains them; off in the paper-faithful configs.
        self.embedding_size = embedding_size
        self.itc_loss_weight = itc_loss_weight
        self.itc_temperature = itc_temperature
        # Where InterBertForPreTraining's ITM negatives come from: "data" - the batch's itm_labels say
        # which pairs the dataset mismatched (TF-IDF hard or random captions); "in_batch" - the batch
        # holds matched pairs only, and the model pairs `itm_negative_ratio` of its captions with
        # another image of the batch, drawn by embedding similarity (ALBEF's hard negatives).
        self.itm_negatives = itm_negatives
        self.itm_negative_ratio = itm_negative_ratio
        # What the matching objectives (ITM, ITC) of InterBertForPreTraining see: "masked" - the original:
        # ITM reads the pooled outputs of the masked pass (MSM/MRM's inputs, often without the words and
        # objects that tell a hard negative apart), ITC embeds the masked caption (and the unmasked regions
        # when the batch carries mrm_feature_targets); "clean" - a second pass on the unmasked caption
        # (restored from msm_labels) and regions (restored from mrm_feature_targets) feeds ITM and ITC,
        # as retrieval and search see them. Clean costs a second forward/backward per step.
        self.itm_inputs = itm_inputs
        # Which pairs the masked-token (MSM) loss is taken on: "all" (the original) or "matched" (itm_label 1:
        # a mismatched caption says nothing about the image). MRM is always on matched pairs only.
        self.msm_pairs = msm_pairs
        self.validate()

    def validate(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.mrm_target not in MRM_TARGETS:
            raise ValueError(f"mrm_target must be one of {MRM_TARGETS}, got {self.mrm_target!r}")
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ValueError(f"itm_negatives must be one of {ITM_NEGATIVES}, got {self.itm_negatives!r}")
        if self.itm_inputs not in ITM_INPUTS:
            raise ValueError(f"itm_inputs must be one of {ITM_INPUTS}, got {self.itm_inputs!r}")
        if self.msm_pairs not in MSM_PAIRS:
            raise ValueError(f"msm_pairs must be one of {MSM_PAIRS}, got {self.msm_pairs!r}")
        if not 0.0 <= self.itm_negative_ratio <= 1.0:
            raise ValueError(f"itm_negative_ratio must be in [0, 1], got {self.itm_negative_ratio}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_size % self.image_num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of image_num_attention_heads "
                f"{self.image_num_attention_heads}"
            )
        for name in ("num_single_stream_layers", "num_text_stream_layers", "num_image_stream_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def num_text_layers(self) -> int:
        """Depth of the BERT text path: single-stream + text-stream layers."""
        return self.num_single_stream_layers + self.num_text_stream_layers


# `AutoConfig.from_pretrained(folder)` reads model_type "interbert" from config.json; the model classes
# register with the AutoModel* classes in interbert.modeling.
AutoConfig.register(InterBertConfig.model_type, InterBertConfig)


PRESETS: dict[str, dict] = {
    # The paper's model: BERT-base text path split 6 + 6, a 6-layer image stack with 8 heads.
    "base": dict(
        vocab_size=30522,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        num_single_stream_layers=6,
        num_text_stream_layers=6,
        num_image_stream_layers=6,
        image_num_attention_heads=8,
        image_intermediate_size=3072,
        region_feature_size=2048,
        num_region_classes=1601,
        pooled_size=1024,
        fusion="mul",
    ),
    # Sized to a 6-layer, 384-wide BERT (MiniLM-L6-H384, e.g. all-MiniLM-L6-v2): `model.from_bert` fills its
    # 3 + 3 text layers, and the same preset from scratch is the "without BERT" arm of RQ4 (issue 13).
    "small": dict(
        vocab_size=30522,
        hidden_size=384,
        num_attention_heads=12,
        intermediate_size=1536,
        num_single_stream_layers=3,
        num_text_stream_layers=3,
        num_image_stream_layers=3,
        image_num_attention_heads=12,
        image_intermediate_size=1536,
        region_feature_size=2048,
        num_region_classes=1601,
        pooled_size=384,
        fusion="mul",
        layer_norm_eps=1e-12,
    ),
    # Small enough to train in minutes on 2 CPU cores (tests, `make demo`).
    "tiny": dict(
        vocab_size=30522,
        hidden_size=128,
        num_attention_heads=4,
        intermediate_size=512,
        num_single_stream_layers=2,
        num_text_stream_layers=2,
        num_image_stream_layers=2,
        image_num_attention_heads=4,
        image_intermediate_size=512,
        region_feature_size=2048,
        num_region_classes=1601,
        pooled_size=128,
        fusion="mul",
        max_position_embeddings=128,
    ),
}


def preset(name: str, **overrides) -> InterBertConfig:
    """Build a config from a named preset (``tiny``, ``small`` or ``base``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return InterBertConfig(**{**PRESETS[name], **overrides})
