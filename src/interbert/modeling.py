"""InterBERT, top to bottom.

    regions (features, 5-d boxes) -> RegionEmbeddings --+
                                                        +-> single-stream module: full attention over
    WordPiece ids -> TextEmbeddings --------------------+   [regions ; text]  (BERT layers 0..S-1)
                                                               |
                                        +----------------------+---------------------+
                                        v                                            v
                              image stream (own heads/FFN)               text stream (BERT layers S..S+T-1)
                                        |                                            |
                             image pooler (position 0 = global region)   text pooler (position 0 = [CLS])
                                        +--------------- fused (mul|sum) -----------+
                                                               v
                                                        ITM / retrieval / VCR heads

Text alone runs the same path without regions, so the text side is exactly BERT. Regions alone run the
same path without text (single-modal image embeddings). Masks are 1 = keep; padding never changes a
valid position's output because attention masks out padded keys (torch SDPA, boolean masks); the
per-position work runs on the real positions only (see `Padding`) and padded outputs are zero.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from interbert.config import InterBertConfig
from interbert.objectives import (  # noqa: F401 (HeadTransform: its home was here)
    HeadTransform,
    ItcObjective,
    ItmObjective,
    MrmObjective,
    MsmObjective,
    NoObjective,
    PretrainingInputs,
    contrastive_loss,
    fuse,
    masked_contrastive_loss,
    mrm_loss,
)
from interbert.remote_code import write_model_code

BOX_DIM = 5  # (x1/W, y1/H, x2/W, y2/H, area fraction)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------
@dataclass
class InterBertOutput(ModelOutput):
    """Sequence and pooled outputs of both streams (``None`` for a modality that was not given)."""

    text_sequence: torch.Tensor | None = None
    image_sequence: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    image_pooled: torch.Tensor | None = None


@dataclass
class InterBertPreTrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    msm_loss: torch.Tensor | None = None
    mrm_loss: torch.Tensor | None = None
    itm_loss: torch.Tensor | None = None
    itc_loss: torch.Tensor | None = None
    itm_labels: torch.Tensor | None = None  # set with in-batch negatives: the labels the ITM loss used
    msm_logits: torch.Tensor | None = None
    mrm_class_logits: torch.Tensor | None = None
    mrm_feature_predictions: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    text_sequence: torch.Tensor | None = None
    image_sequence: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    image_pooled: torch.Tensor | None = None


@dataclass
class InterBertScoreOutput(ModelOutput):
    """One score per input (retrieval pair, VCR choice) or class logits (text classification)."""

    loss: torch.Tensor | None = None
    itc_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    image_pooled: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
class TextEmbeddings(nn.Module):
    """BERT's embeddings: word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: InterBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class RegionEmbeddings(nn.Module):
    """LayerNorm(Linear(feature) + Linear(5-d box)): the region's content and where it is."""

    def __init__(self, config: InterBertConfig):
        super().__init__()
        self.feature_projection = nn.Linear(config.region_feature_size, config.hidden_size)
        self.box_projection = nn.Linear(BOX_DIM, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.image_hidden_dropout_prob)

    def forward(self, features: torch.Tensor | None, boxes: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """``projected``: ``feature_projection(features)`` when the caller has it already (a pretraining
        step computes it once for its passes); ``features`` is then not read."""
        if projected is None:
            projected = self.feature_projection(features)
        return self.dropout(self.LayerNorm(projected + self.box_projection(boxes)))


@dataclass
class Padding:
    """Where the real positions of a padded B x L batch are, found once per stack.

    Layers run their per-position work (projections, feed-forward, LayerNorms: nearly all the FLOPs)
    on the N real rows only, and attend in the padded B x L layout. With captions of 8-36 tokens and
    10-36 regions a third of a dynamically padded batch is padding, so this saves about a third of a
    step. Padded positions of the outputs are zero.
    """

    shape: tuple[int, int]
    index: torch.Tensor | None  # flat indices of the real positions; None when nothing is padded
    attn_mask: torch.Tensor | None  # B x 1 x 1 x L boolean, True where a key may be attended to

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> "Padding":
        """``keep``: B x L boolean, True at real positions."""
        if bool(keep.all()):
            return cls(tuple(keep.shape), None, None)
        return cls(tuple(keep.shape), keep.flatten().nonzero().squeeze(1), keep[:, None, None, :])

    @classmethod
    def static(cls, keep: torch.Tensor) -> "Padding":
        """Every position computed, the pad only masked as attention keys: no ``nonzero`` (a shape that
        depends on the data) and no host sync, so a compiled step captures the stack as one graph. Costs the
        per-position work of the pad, which length buckets keep small (``model.set_static_shapes``)."""
        return cls(tuple(keep.shape), None, keep[:, None, None, :])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """B x L x H -> N x H (the real rows)."""
        flat = x.reshape(-1, x.shape[-1])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """N x H -> B x L x H with zeros at padded positions."""
        b, n = self.shape
        if self.index is not None:
            x = x.new_zeros(b * n, x.shape[-1]).index_copy(0, self.index, x)
        return x.view(b, n, -1)

    def rows_of(self, needed: torch.Tensor) -> torch.Tensor:
        """Packed row indices of the real positions where ``needed`` (B x L bool) is True."""
        flat = needed.flatten()
        return (flat if self.index is None else flat[self.index]).nonzero().squeeze(1)

    def sequence_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The batch row (sequence) of each packed row."""
        return (rows if self.index is None else self.index[rows]) // self.shape[1]

    def query_slots(self, rows: torch.Tensor) -> "QuerySlots":
        """Where each of ``rows`` (packed, ascending) goes in a B x S query batch, S the most rows any one
        sequence has: its sequence, in the order of its rows."""
        seq = self.sequence_of(rows)
        counts = torch.bincount(seq, minlength=self.shape[0])
        per_sequence = int(counts.max()) if len(rows) else 1
        first = torch.cumsum(counts, 0) - counts  # the position in ``rows`` of each sequence's first row
        slot = torch.arange(len(rows), device=rows.device) - first[seq]
        return QuerySlots(seq * per_sequence + slot, self.shape[0] * per_sequence)


@dataclass
class QuerySlots:
    """The last layer's needed rows laid out as a few queries per sequence (:meth:`Padding.query_slots`), so
    that they attend over their sequence's keys in place: no copy of a sequence's keys and values per row,
    whose backward (a scatter-add of B x heads x L x d per needed row) cost more than the layer's matmuls."""

    index: torch.Tensor  # M: the flat slot (sequence * S + slot) of each needed row
    size: int  # B * S

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """M x H rows -> (B * S) x H, each row at its slot, zeros elsewhere."""
        return x.new_zeros(self.size, x.shape[-1]).index_copy(0, self.index, x)


class TransformerLayer(nn.Module):
    """A post-LayerNorm BERT layer: self-attention and feed-forward, each with residual + LayerNorm."""

    # Gradient checkpointing (transformers' convention: ``model.gradient_checkpointing_enable()`` sets
    # these on every module that has them): keep only the layer's input for the backward pass and
    # recompute its activations there. Non-reentrant checkpointing restores the RNG state, so dropout
    # draws the same masks in the recomputation and the gradients equal those of a plain run.
    gradient_checkpointing = False
    _gradient_checkpointing_func = staticmethod(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.act = ACT2FN[act]
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: Padding, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: N x H, the real positions of a B x L batch as ``padding`` packed them.

        ``rows`` (packed row indices): compute the output of those rows only (M x H). Keys and values
        still come from every row; the queries, attention output and feed-forward - most of a layer -
        run on the M rows. The last layer of a stack whose readers look at a few positions (the poolers'
        first position, the masked tokens and regions) needs no more."""
        (b, n), h = padding.shape, x.shape[-1]

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return padding.unpack(t).view(b, n, self.heads, h // self.heads).transpose(1, 2)

        k, v = split_heads(self.key(x)), split_heads(self.value(x))
        p = self.attn_dropout if self.training else 0.0
        if rows is None:
            q = split_heads(self.query(x))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=padding.attn_mask, dropout_p=p)
            context = padding.pack(context.transpose(1, 2).reshape(b, n, h))
        elif p == 0.0:  # the needed rows' queries, grouped by sequence, attend over their sequence's keys
            x = x.index_select(0, rows)
            slots = padding.query_slots(rows)
            q = slots.place(self.query(x)).view(b, -1, self.heads, h // self.heads).transpose(1, 2)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=padding.attn_mask)
            context = context.transpose(1, 2).reshape(-1, h).index_select(0, slots.index)
        else:  # each needed row attends, as a batch of one query, over the keys of its own sequence
            seq = padding.sequence_of(rows)
            x = x.index_select(0, rows)
            q = self.query(x).view(-1, self.heads, 1, h // self.heads)
            mask = None if padding.attn_mask is None else padding.attn_mask[seq]
            # index_select, not k[seq]: seq repeats indices, and the backward of advanced indexing on CPU
            # with 2+ threads adds them with float atomics in any order (runs differed in the last bits).
            # With attention dropout, this layout's dropout draws are the ones recorded runs were made with.
            k, v = k.index_select(0, seq), v.index_select(0, seq)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).reshape(-1, h)
        x = self.attn_norm(x + self.dropout(self.attn_out(context)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


def run_stack(layers: nn.ModuleList, hidden: torch.Tensor, keep: torch.Tensor,
              needed: torch.Tensor | None = None, static: bool = False) -> torch.Tensor:
    """Run ``layers`` over a padded B x L x H batch (``keep``: B x L, True at real positions).
    ``needed`` (B x L bool): the positions whose output is read; the last layer computes only those,
    the others are zero in the result (None: every real position).

    ``static``: the same outputs from static shapes only (:meth:`Padding.static`): every position runs
    through every layer and the positions not read (pad, or not ``needed``) are zeroed at the end."""
    if static:
        padding = Padding.static(keep)
        x = hidden
        for layer in layers:
            if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
                x = layer._gradient_checkpointing_func(layer, x.reshape(-1, x.shape[-1]), padding, None)
            else:
                x = layer(x.reshape(-1, x.shape[-1]), padding, None)
        read = keep if needed is None else needed & keep
        return x.view(hidden.shape) * read[..., None].to(x.dtype)
    padding = Padding.from_keep(keep)
    x = padding.pack(hidden)
    rows = None if needed is None or not len(layers) else padding.rows_of(needed)
    for i, layer in enumerate(layers):
        last_rows = rows if i == len(layers) - 1 else None
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            x = layer._gradient_checkpointing_func(layer, x, padding, last_rows)
        else:
            x = layer(x, padding, last_rows)
    if rows is not None:
        x = x.new_zeros(len(padding.index) if padding.index is not None else keep.numel(), x.shape[-1]).index_copy(0, rows, x)
    return padding.unpack(x)


def capturing_graph() -> bool:
    """Whether ``forward`` is being captured as one graph for every input (``torch.export``, the ONNX exporter
    built on it, ``torch.jit.trace``). The default mode packs the real positions (:class:`Padding`): a shape
    and a branch that depend on the mask, which such a graph would fix to the example's padding. Captured,
    the stacks run the static-shape way (:func:`run_stack`), whose outputs are the same to float rounding.
    Not ``torch.compile``: it handles the packed shapes itself, and ``train.compile`` picks the mode."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def first_position(keep: torch.Tensor | None) -> torch.Tensor | None:
    """B x L bool, True at position 0 only: what the poolers read."""
    if keep is None:
        return None
    needed = torch.zeros_like(keep, dtype=torch.bool)
    needed[:, 0] = True
    return needed


def _text_layer(config: InterBertConfig) -> TransformerLayer:
    return TransformerLayer(
        config.hidden_size, config.num_attention_heads, config.intermediate_size, config.hidden_act,
        config.hidden_dropout_prob, config.attention_probs_dropout_prob, config.layer_norm_eps,
    )


def _image_layer(config: InterBertConfig) -> TransformerLayer:
    return TransformerLayer(
        config.hidden_size, config.image_num_attention_heads, config.image_intermediate_size, config.hidden_act,
        config.image_hidden_dropout_prob, config.image_attention_probs_dropout_prob, config.layer_norm_eps,
    )


class Pooler(nn.Module):
    """Linear + ReLU on the first position of a stream ([CLS] for text, the global region for images)."""

    def __init__(self, hidden: int, pooled: int):
        super().__init__()
        self.dense = nn.Linear(hidden, pooled)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(sequence[:, 0]))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class InterBertPreTrainedModel(PreTrainedModel):
    config_class = InterBertConfig
    config: InterBertConfig
    base_model_prefix = "interbert"
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # per TransformerLayer, see run_stack
    _trains_embeddings = False  # whether the head has the contrastive (ITC) loss, on when itc_loss_weight > 0
    # Static shapes (set_static_shapes): no data-dependent shapes or host syncs in forward, for torch.compile.
    static_shapes = False

    def set_static_shapes(self, on: bool = True) -> "InterBertPreTrainedModel":
        """Run ``forward`` with static shapes only, so that ``torch.compile`` captures it as one graph (with
        length buckets, a handful of graphs for a run): the stacks compute every position and mask the pad
        (:func:`run_stack`), the MSM/MRM heads and losses cover every position with the unscored ones ignored
        (MSM: only the batch's ``msm_positions`` when it has them, a fixed budget per length bucket), ITC masks
        the unmatched pairs instead of selecting the matched ones. The losses and pooled outputs are those of
        the default mode (to float rounding); ``msm_logits`` / ``mrm_*`` then cover every position (as with
        ``full_logits``), or ``msm_logits`` the budget's rows. More arithmetic per step, fewer launches and
        syncs: whether it pays is for a benchmark to say (``train.compile`` turns it on). Not saved with the
        model."""
        for module in self.modules():
            if isinstance(module, InterBertPreTrainedModel):
                module.static_shapes = bool(on)
        return self

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save, and the code the folder needs to load where interbert is not installed
        (``AutoModel.from_pretrained(folder, trust_remote_code=True)``): the modeling files beside the weights,
        their classes in config.json's ``auto_map`` (:mod:`interbert.remote_code`). Written first, so that
        ``push_to_hub=True`` uploads them too."""
        if kwargs.get("is_main_process", True) and not os.path.isfile(save_directory):  # a file: transformers says so
            os.makedirs(save_directory, exist_ok=True)
            write_model_code(save_directory, self.config)
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, InterBertForPreTraining):
            init.zeros_(module.msm_bias)

    def unused_parameter_names(self) -> list[str]:
        """The parameters that no loss of this model reaches with its current config (e.g. the image side
        of a text classifier). The training loop freezes them: DistributedDataParallel would otherwise
        wait for gradients that never come, and fail."""
        unused = {id(p) for module in self._modules_without_loss() for p in module.parameters()}
        return [name for name, p in self.named_parameters() if id(p) in unused]

    # CLIP's names for the single-modal embeddings (open_clip's encode_text / encode_image), on every model
    # class: the encoder's embed_text / embed_images, which the search index and service use, so an embedding
    # computed here is one an index built by `interbert index build` can be searched with.
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """B x E L2-normalised text embeddings (E = ``embedding_size``, or ``pooled_size`` without projections):
        the text alone through its path, pooled at [CLS], projected. Cosine similarity is a dot product."""
        return self._encoder().embed_text(input_ids, attention_mask, token_type_ids)

    def get_image_features(self, region_features: torch.Tensor, region_boxes: torch.Tensor,
                           region_mask: torch.Tensor | None = None) -> torch.Tensor:
        """B x E L2-normalised image embeddings from regions as :class:`~interbert.processing.InterBertProcessor`
        prepares them (global region first, 5-d boxes): the regions alone, pooled at the global region, projected."""
        return self._encoder().embed_images(region_features, region_boxes, region_mask)

    def _encoder(self) -> "InterBertModel":
        return getattr(self, self.base_model_prefix, self)

    def _modules_without_loss(self) -> list[nn.Module]:
        # The single-modal embedding projections serve candidate search; only the contrastive loss trains them.
        base = getattr(self, self.base_model_prefix, self)
        if base.config.embedding_size and not (self._trains_embeddings and self.config.itc_loss_weight > 0):
            return [base.text_projection, base.image_projection]
        return []


class InterBertModel(InterBertPreTrainedModel):
    def __init__(self, config: InterBertConfig):
        super().__init__(config)
        self.embeddings = TextEmbeddings(config)
        self.region_embeddings = RegionEmbeddings(config)
        self.single_stream = nn.ModuleList([_text_layer(config) for _ in range(config.num_single_stream_layers)])
        self.text_stream = nn.ModuleList([_text_layer(config) for _ in range(config.num_text_stream_layers)])
        self.image_stream = nn.ModuleList([_image_layer(config) for _ in range(config.num_image_stream_layers)])
        self.text_pooler = Pooler(config.hidden_size, config.pooled_size)
        self.image_pooler = Pooler(config.hidden_size, config.pooled_size)
        if config.embedding_size:
            self.text_projection = nn.Linear(config.pooled_size, config.embedding_size)
            self.image_projection = nn.Linear(config.pooled_size, config.embedding_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, region_features, region_boxes, region_mask,
                      region_projection=None):
        if input_ids is None and region_features is None and region_projection is None:
            raise ValueError("give input_ids (text), region_features (image), or both")
        batch = []  # sizes compared, not hashed: under torch.export a size is a symbol, which a set cannot hold
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be batch x tokens, got shape {tuple(input_ids.shape)}")
            if input_ids.shape[1] > self.config.max_position_embeddings:
                raise ValueError(
                    f"{input_ids.shape[1]} tokens exceed max_position_embeddings={self.config.max_position_embeddings}"
                )
            for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
                if t is not None and t.shape != input_ids.shape:
                    raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}")
            batch.append(input_ids.shape[0])
        # the regions come as features, or as their projection (what the features project to, computed by the caller)
        name, regions, d, field = (("region_features", region_features, self.config.region_feature_size, "region_feature_size")
                                   if region_features is not None or region_projection is None else
                                   ("region_projection", region_projection, self.config.hidden_size, "hidden_size"))
        if regions is not None:
            if regions.dim() != 3 or regions.shape[-1] != d:
                raise ValueError(f"{name} must be batch x regions x {d} (config.{field}), got shape {tuple(regions.shape)}")
            if region_boxes is None or region_boxes.shape != (*regions.shape[:2], BOX_DIM):
                got = None if region_boxes is None else tuple(region_boxes.shape)
                raise ValueError(
                    f"region_boxes must be batch x regions x {BOX_DIM} (x1/W, y1/H, x2/W, y2/H, area) matching "
                    f"{name} {tuple(regions.shape)}, got {got}"
                )
            if region_mask is not None and region_mask.shape != regions.shape[:2]:
                raise ValueError(f"region_mask has shape {tuple(region_mask.shape)}, expected {tuple(regions.shape[:2])}")
            batch.append(regions.shape[0])
        if len(batch) > 1 and batch[0] != batch[1]:
            raise ValueError(f"text and regions have different batch sizes: {sorted(batch)}")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
    ) -> InterBertOutput:
        return self.encode(*self.embed_inputs(input_ids, attention_mask, token_type_ids, region_features, region_boxes,
                                              region_mask))

    def embed_inputs(self, input_ids=None, attention_mask=None, token_type_ids=None, region_features=None,
                     region_boxes=None, region_mask=None, region_projection=None) -> tuple:
        """Checked inputs -> ``(text, text_keep, image, image_keep)`` embedded, as :meth:`encode` takes them.
        ``region_projection`` (B x R x hidden): the regions' feature projection computed by the caller, in
        place of ``region_features`` (see :meth:`InterBertForPreTraining.project_regions`)."""
        self._check_inputs(input_ids, attention_mask, token_type_ids, region_features, region_boxes, region_mask,
                           region_projection)
        image = image_keep = text = text_keep = None
        if region_features is not None or region_projection is not None:
            image = self.region_embeddings(region_features, region_boxes, region_projection)
            image_keep = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device) if region_mask is None else region_mask.bool()
        if input_ids is not None:
            text = self.embeddings(input_ids, token_type_ids)
            text_keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return text, text_keep, image, image_keep

    def encode(
        self,
        text: torch.Tensor | None,
        text_keep: torch.Tensor | None,
        image: torch.Tensor | None,
        image_keep: torch.Tensor | None,
        text_needed: torch.Tensor | None = None,
        image_needed: torch.Tensor | None = None,
        static: bool = False,
    ) -> InterBertOutput:
        """Everything after the embeddings, on already-embedded inputs (B x L x H, keep masks B x L).

        Retrieval evaluation embeds each image and caption once and pairs the embeddings up here,
        instead of re-embedding an image for every caption it is scored against.
        ``text_needed`` / ``image_needed`` (B x L bool, position 0 included): the sequence positions the
        caller reads; the streams' last layers compute only those, and the other positions of the
        sequence outputs are zero (the poolers read position 0). None: every position.
        ``static``: this call the static-shape way whatever the model's mode (a compiled scorer's pass, see
        :mod:`interbert.static_scoring`, without switching the model that other threads may be running).
        """
        streams = [(h, k.bool()) for h, k in ((image, image_keep), (text, text_keep)) if h is not None]
        # Single-stream interaction: full attention over [regions ; text].
        hidden = torch.cat([h for h, _ in streams], dim=1)
        static = static or self.static_shapes or capturing_graph()
        hidden = run_stack(self.single_stream, hidden, torch.cat([k for _, k in streams], dim=1), static=static)

        # Two-stream extraction: each modality continues in its own stack.
        out = {}
        if image is not None:
            image_out = run_stack(self.image_stream, hidden[:, : image.shape[1]], image_keep.bool(), image_needed, static)
            out.update(image_sequence=image_out, image_pooled=self.image_pooler(image_out))
        if text is not None:
            text_out = run_stack(self.text_stream, hidden[:, hidden.shape[1] - text.shape[1] :], text_keep.bool(), text_needed,
                                 static)
            out.update(text_sequence=text_out, text_pooled=self.text_pooler(text_out))
        return InterBertOutput(**out)


    # Single-modal embeddings: each modality alone through the same path (the two-stream module keeps
    # its own stack), pooled, projected, L2-normalised. Cosine similarity of these gives candidates.
    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None) -> torch.Tensor:
        text, keep, _, _ = self.embed_inputs(input_ids, attention_mask, token_type_ids)
        pooled = self.encode(text, keep, None, None, text_needed=first_position(keep)).text_pooled
        return F.normalize(self.text_projection(pooled) if self.config.embedding_size else pooled, dim=-1)

    def embed_images(self, region_features: torch.Tensor | None, region_boxes: torch.Tensor, region_mask: torch.Tensor | None = None,
                     region_projection: torch.Tensor | None = None) -> torch.Tensor:
        _, _, image, keep = self.embed_inputs(region_features=region_features, region_boxes=region_boxes, region_mask=region_mask,
                                              region_projection=region_projection)
        pooled = self.encode(None, None, image, keep, image_needed=first_position(keep)).image_pooled
        return F.normalize(self.image_projection(pooled) if self.config.embedding_size else pooled, dim=-1)

    def contrastive_loss(self, batch: dict, positives: torch.Tensor) -> torch.Tensor:
        """In-batch InfoNCE (both directions) between the texts and images of the matched pairs.

        With one matched pair there is nothing to contrast and the loss is 0; with none, 0 through the
        projections: either way they get a (zero) gradient, as DistributedDataParallel needs on every
        rank, whatever a rank's share of the batch holds."""
        if self.static_shapes:  # every pair embedded, the unmatched ones masked out of the loss
            text = self.embed_text(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
            image = self.embed_images(batch.get("region_features"), batch["region_boxes"], batch.get("region_mask"),
                                      batch.get("region_projection"))
            return masked_contrastive_loss(text, image, positives.bool(), self.config.itc_temperature)
        rows = positives.nonzero().squeeze(-1)
        if rows.numel() == 0:
            zero = torch.zeros((), device=positives.device)
            if self.config.embedding_size:
                for p in (*self.text_projection.parameters(), *self.image_projection.parameters()):
                    zero = zero + 0.0 * p.sum()
            return zero
        take = lambda name: None if batch.get(name) is None else batch[name][rows]  # noqa: E731
        text = self.embed_text(take("input_ids"), take("attention_mask"), take("token_type_ids"))
        image = self.embed_images(take("region_features"), take("region_boxes"), take("region_mask"), take("region_projection"))
        return contrastive_loss(text, image, self.config.itc_temperature)


# --------------------------------------------------------------------------------------------------
# Pretraining: the encoder passes of a step, and the model that composes the objectives
# --------------------------------------------------------------------------------------------------
class EncoderPasses:
    """The encoder passes of one pretraining step: the masked pass (None in a matching step) and the pass
    ITM reads (the masked pass itself, a clean one, or None when nothing reads it).

    The matching pass runs when first read (by ITM, after the MSM and MRM heads): the order in which a
    step builds its graph is the order backward sums a shared weight's gradients in (the word embeddings
    take them from every pass and the MSM decoder), so this order keeps the gradients bit for bit."""

    _UNSET = object()

    def __init__(self, masked: InterBertOutput | None, matching: Callable[[], InterBertOutput | None]):
        self.masked = masked
        self._matching = matching
        self._matching_pass = self._UNSET

    @property
    def matching(self) -> InterBertOutput | None:
        # memoised by hand: functools.cached_property takes a lock, a context manager torch.compile cannot trace
        if self._matching_pass is self._UNSET:
            self._matching_pass = self._matching()
        return self._matching_pass

    @property
    def first(self) -> InterBertOutput:
        """The pass whose sequence outputs the step returns."""
        return self.masked if self.masked is not None else self.matching


def pooled_pass(encoder: InterBertModel, text: dict, image: dict) -> InterBertOutput:
    """The encoder computing only what the poolers read (position 0 of each stream)."""
    embedded = encoder.embed_inputs(**text, **image)
    return encoder.encode(*embedded, text_needed=first_position(embedded[1]), image_needed=first_position(embedded[3]))


class PassPlan:
    """Which encoder passes a pretraining step runs, and which positions each computes.

    The masked pass computes the streams' last layers only at the positions MSM and MRM read and the
    poolers' position 0 (the vocabulary projection over every token would dominate the step); a matching
    step (ITM labels, nothing masked) runs one pass computing position 0 alone. ``itm_inputs="clean"`` adds
    a pass on the clean inputs for ITM (position 0 only) when something was masked, and none on a masked
    step without ITM labels (nothing would read it); ``"masked"`` (the original) lets ITM read the masked pass."""

    def __init__(self, encoder: InterBertModel, itm_inputs: str):
        self.encoder = encoder
        self.matching_pass = self._clean_pass if itm_inputs == "clean" else self._masked_pass_itself

    def run(self, batch: PretrainingInputs, text_at: torch.Tensor | None, region_at: torch.Tensor | None) -> EncoderPasses:
        """``text_at`` / ``region_at`` (B x L bool): the positions the heads read; None: every position."""
        if batch.matching_only:
            return EncoderPasses(None, lambda: pooled_pass(self.encoder, batch.text, batch.image))
        masked = self.encoder.encode(
            *self.encoder.embed_inputs(**batch.text, **batch.image),
            text_needed=None if text_at is None else text_at | first_position(text_at),
            image_needed=None if region_at is None else region_at | first_position(region_at),
        )
        return EncoderPasses(masked, lambda: self.matching_pass(batch, masked))

    @staticmethod
    def _masked_pass_itself(batch: PretrainingInputs, masked: InterBertOutput) -> InterBertOutput:
        return masked

    def _clean_pass(self, batch: PretrainingInputs, masked: InterBertOutput) -> InterBertOutput | None:
        if not batch.restored:  # nothing masked (inference, a matching step): the given inputs are the clean ones
            return masked
        if batch.itm_labels is None:  # a masked step: ITM never reads a masked pass here, and nothing scores it
            return None
        return pooled_pass(self.encoder, batch.clean_text, batch.clean_image)


class InterBertForPreTraining(InterBertPreTrainedModel):
    """MSM (masked segments) + MRM (masked region groups) + ITM (+ ITC when ``itc_loss_weight > 0``), on
    top of :class:`InterBertModel`, one object each (:mod:`interbert.objectives`), built for this config.
    The objectives' heads are registered here under the names checkpoints use (see that module); the MRM
    head has the one decoder of ``config.mrm_target``."""

    _trains_embeddings = True

    def __init__(self, config: InterBertConfig):
        super().__init__(config)
        self.interbert = InterBertModel(config)
        # the objectives, with the variant the config chose; their heads registered in this order (the
        # parameters' order, which optimizer states saved by a run are indexed by)
        self.msm = MsmObjective(self, config.msm_pairs)
        self.mrm = MrmObjective(self, config.mrm_target)
        self.itm = ItmObjective(self, config.itm_negatives, trains_embeddings=config.itc_loss_weight > 0)
        self.itc = ItcObjective(self, config.itm_negatives, config.itm_inputs) if config.itc_loss_weight > 0 else NoObjective()
        for objective in (self.msm, self.mrm, self.itm, self.itc):
            for name, head in objective.heads(config).items():
                setattr(self, name, head)
        self.passes = PassPlan(self.interbert, config.itm_inputs)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        region_features: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        msm_labels: torch.Tensor | None = None,
        mrm_mask: torch.Tensor | None = None,
        mrm_class_targets: torch.Tensor | None = None,
        mrm_feature_targets: torch.Tensor | None = None,
        itm_labels: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        full_logits: bool = False,
        msm_positions: torch.Tensor | None = None,
    ) -> InterBertPreTrainingOutput:
        """With labels, the masked-token and masked-region heads run only where there is something to
        predict (the vocabulary projection over every token would dominate the step): ``msm_logits`` is
        then N_masked x V, ``mrm_*`` N_scored x C / x D, in row-major order of the masked positions.
        Without labels, or with ``full_logits=True``, they cover every position (B x T x V, B x R x C).
        The MRM output is ``mrm_class_logits`` or ``mrm_feature_predictions`` as ``config.mrm_target``
        says, and with ``mrm_mask`` the batch must hold the targets of that kind.

        With ``config.itm_negatives == "in_batch"`` the batch holds matched pairs only (``itm_labels`` all
        1); some captions are re-paired here with another image of the batch (``image_index``: equal values
        mark captions of the same image, never used as each other's negatives) and ``itm_labels`` in the
        output are the labels the ITM loss was computed with. ``text_pooled``/``image_pooled`` in the output
        are the ones ITM read (the masked pass's, or with ``config.itm_inputs == "clean"`` a clean pass's).

        ``msm_positions`` (K long, the collate's masked-token budget, :func:`interbert.data.batches.masked_positions`)
        is read in the static-shape mode only: the MSM head then runs on those K rows (``msm_logits`` K x V) instead
        of every position; the default mode selects the masked tokens itself, with the same loss."""
        text = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        image = dict(region_features=region_features, region_boxes=region_boxes, region_mask=region_mask)
        clean_text = self.clean_text(text, msm_labels)
        image, clean_image = self.project_regions(image, mrm_mask, mrm_feature_targets)
        batch = PretrainingInputs(
            text, clean_text, image, clean_image, msm_labels=msm_labels, mrm_mask=mrm_mask, itm_labels=itm_labels,
            mrm_class_targets=mrm_class_targets, mrm_feature_targets=mrm_feature_targets, image_index=image_index,
            full_logits=full_logits, msm_positions=msm_positions)
        batch = self.itm.pair(batch)  # ITM's pairs: the data's, or in-batch negatives
        passes = self.passes.run(batch, text_at=self.msm.positions(batch), region_at=self.mrm.positions(batch))
        msm = self.msm(passes, batch)
        mrm = self.mrm(passes, batch)
        itm = self.itm(passes, batch)
        itc = self.itc(passes, batch)

        c = self.config
        weighted = [w * o.loss for o, w in ((msm, c.msm_loss_weight), (mrm, c.mrm_loss_weight),
                                            (itm, c.itm_loss_weight), (itc, c.itc_loss_weight)) if o.loss is not None]
        matching = passes.matching
        return InterBertPreTrainingOutput(
            loss=torch.stack(weighted).sum() if weighted else None,
            msm_loss=msm.loss, mrm_loss=mrm.loss, itm_loss=itm.loss, itc_loss=itc.loss,
            **msm.outputs, **mrm.outputs, **itm.outputs,
            text_sequence=passes.first.text_sequence, image_sequence=passes.first.image_sequence,
            text_pooled=None if matching is None else matching.text_pooled,
            image_pooled=None if matching is None else matching.image_pooled,
        )

    def itm_logits(self, text_pooled: torch.Tensor, image_pooled: torch.Tensor) -> torch.Tensor:
        """The ITM head (dropout in training) on pooled outputs."""
        return self.itm.logits(text_pooled, image_pooled)

    def score_pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None, region_features: torch.Tensor | None = None,
                    region_boxes: torch.Tensor | None = None, region_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One matching score per (text, image) pair (row i of the text with row i of the regions): the ITM
        margin ``logit(match) - logit(mismatch)``, which the search service re-ranks with and which a retrieval
        model loaded from this folder (``load_model(folder, task="retrieval")``) starts from. Only what the
        poolers read is computed, not the MSM/MRM heads."""
        if input_ids is None or region_features is None:
            raise ValueError("score_pairs scores (text, image) pairs: give both input_ids and region_features")
        text = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        image = dict(region_features=region_features, region_boxes=region_boxes, region_mask=region_mask)
        pooled = pooled_pass(self.interbert, text, image)
        itm = self.itm_logits(pooled.text_pooled, pooled.image_pooled)
        return itm[:, 1] - itm[:, 0]

    def mine_in_batch_negatives(self, text: dict, image: dict, itm_labels: torch.Tensor, image_index):
        """ALBEF's in-batch negatives from a batch of matched pairs: ``(image_order, itm_labels, itc_loss)``
        (see :meth:`ItmObjective.in_batch_negatives`); ``itc_loss`` is that of the embeddings which drew the
        negatives, None when ``itc_loss_weight`` is 0."""
        order, itm_labels, embeddings = self.itm.in_batch_negatives(text, image, itm_labels, image_index)
        itc = contrastive_loss(*embeddings, self.config.itc_temperature) if self.config.itc_loss_weight > 0 else None
        return order, itm_labels, itc

    @staticmethod
    def clean_text(text: dict, msm_labels) -> dict:
        """The caption as written: masked ids restored from ``msm_labels`` (without them, as given)."""
        text = dict(text)
        if msm_labels is not None and text["input_ids"] is not None:
            text["input_ids"] = torch.where(msm_labels != -100, msm_labels, text["input_ids"])
        return text

    @staticmethod
    def clean_inputs(text: dict, image: dict, msm_labels, mrm_mask, mrm_feature_targets) -> tuple[dict, dict]:
        """The caption as written (masked ids restored from ``msm_labels``) and the regions as detected
        (masked features restored from ``mrm_feature_targets``, the original features); an input without
        what restores it stays as given. (The step itself restores the regions' projection instead:
        :meth:`project_regions`.)"""
        text, image = InterBertForPreTraining.clean_text(text, msm_labels), dict(image)
        if mrm_feature_targets is not None and mrm_mask is not None and image["region_features"] is not None:
            image["region_features"] = torch.where(mrm_mask.bool()[..., None], mrm_feature_targets, image["region_features"])
        return text, image

    def project_regions(self, image: dict, mrm_mask, mrm_feature_targets) -> tuple[dict, dict]:
        """``(masked, clean)``: the image inputs as given and as detected (the masked regions restored from
        ``mrm_feature_targets``, as :meth:`clean_inputs` restores them), each carrying ``region_projection``
        (the feature projection, Linear D -> hidden) in place of ``region_features``.

        The projection is the biggest single matmul of a small model's step, and a step reads it up to three
        times (masked pass, clean matching pass, ITC's image pass): it runs once here, on the real regions as
        given, and again on the restored rows only (~15% of them); the passes share it and its backward is
        one matmul too. The two differ only in those rows; padded rows are zero (no layer reads them)."""
        features = image["region_features"]
        if features is None:
            return image, image
        keep = image["region_mask"]
        self.interbert._check_inputs(None, None, None, features, image["region_boxes"], keep)  # a clear error first
        b, r, d = features.shape
        if self.static_shapes:  # every row projected, the masked ones restored by a where (no row selection)
            real = (torch.ones(b, r, device=features.device) if keep is None else keep)[..., None].to(features.dtype)
            project = self.interbert.region_embeddings.feature_projection
            given = project(features) * real
            masked = {**image, "region_features": None, "region_projection": given}
            if mrm_feature_targets is None or mrm_mask is None:
                return masked, masked
            restored = torch.where(mrm_mask.bool()[..., None], project(mrm_feature_targets) * real, given)
            return masked, {**masked, "region_projection": restored}
        padding = Padding.from_keep(torch.ones(b, r, dtype=torch.bool, device=features.device) if keep is None else keep.bool())
        project = self.interbert.region_embeddings.feature_projection
        given = project(padding.pack(features))  # N x H, the real rows
        masked = {**image, "region_features": None, "region_projection": padding.unpack(given)}
        if mrm_feature_targets is None or mrm_mask is None:
            return masked, masked
        rows = padding.rows_of(mrm_mask.bool())
        flat = rows if padding.index is None else padding.index.index_select(0, rows)
        restored = given.index_copy(0, rows, project(mrm_feature_targets.reshape(-1, d).index_select(0, flat)))
        return masked, {**masked, "region_projection": padding.unpack(restored)}


class _PairScorer(InterBertPreTrainedModel):
    """One matching logit per (image, text) pair from the fused pooled outputs."""

    def __init__(self, config: InterBertConfig):
        super().__init__(config)
        self.interbert = InterBertModel(config)
        self.dropout = nn.Dropout(config.itm_dropout_prob)
        self.score = nn.Linear(config.pooled_size, 1)
        self.post_init()

    def pair_scores(self, **inputs: torch.Tensor | None) -> tuple[torch.Tensor, InterBertOutput]:
        """The score of each pair and the pooled outputs (the sequence outputs hold position 0 only:
        the streams' last layers compute what the poolers read and no more)."""
        text, text_keep, image, image_keep = self.interbert.embed_inputs(**inputs)
        base = self.interbert.encode(text, text_keep, image, image_keep, first_position(text_keep), first_position(image_keep))
        if base.text_pooled is None or base.image_pooled is None:
            raise ValueError(f"{type(self).__name__} scores (image, text) pairs: give both text and regions")
        logits = self.score(self.dropout(fuse(base.text_pooled, base.image_pooled, self.config.fusion))).squeeze(-1)
        return logits, base

    def score_pairs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None, region_features: torch.Tensor | None = None,
                    region_boxes: torch.Tensor | None = None, region_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One matching logit per (text, image) pair (row i of the text with row i of the regions), flat
        (B,): what ``forward`` returns as ``logits`` for a retrieval model, without loss or pooled outputs."""
        return self.pair_scores(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                region_features=region_features, region_boxes=region_boxes, region_mask=region_mask)[0]


class InterBertForImageTextRetrieval(_PairScorer):
    """Scores (image, caption) pairs. Fine-tuned as the original: groups of ``group_size`` pairs whose
    first pair is the positive (positive, random caption, random image, hard negative), cross-entropy
    over each group (+ ITC between the positives when ``itc_loss_weight > 0``)."""

    _trains_embeddings = True

    def forward(
        self,
        input_ids=None, attention_mask=None, token_type_ids=None,
        region_features=None, region_boxes=None, region_mask=None,
        group_size: int | None = None,
        labels: torch.Tensor | None = None,
    ) -> InterBertScoreOutput:
        logits, base = self.pair_scores(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            region_features=region_features, region_boxes=region_boxes, region_mask=region_mask,
        )
        loss = itc_loss = None
        if group_size is not None:
            group_size = int(group_size)
            if logits.shape[0] % group_size:
                raise ValueError(f"batch of {logits.shape[0]} pairs is not a multiple of group_size={group_size}")
            grouped = logits.view(-1, group_size)
            loss = F.cross_entropy(grouped, grouped.new_zeros(grouped.shape[0], dtype=torch.long))
            if self.config.itc_loss_weight > 0:  # a single group: 0, with the graph DDP needs
                positives = torch.zeros_like(logits, dtype=torch.bool).view(-1, group_size)
                positives[:, 0] = True
                inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              region_features=region_features, region_boxes=region_boxes, region_mask=region_mask)
                itc_loss = self.interbert.contrastive_loss(inputs, positives.flatten())
                loss = loss + self.config.itc_loss_weight * itc_loss
        elif labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        return InterBertScoreOutput(
            loss=loss, itc_loss=itc_loss, logits=logits, text_pooled=base.text_pooled, image_pooled=base.image_pooled
        )


class InterBertForMultipleChoice(_PairScorer):
    """VCR: one score per (image, question+choice) pair, softmax over the choices.

    Text inputs are batch x choices x tokens; regions are batch x choices x regions x D or, when all
    choices share the same regions, batch x regions x D (broadcast over choices).
    """

    def forward(
        self,
        input_ids=None, attention_mask=None, token_type_ids=None,
        region_features=None, region_boxes=None, region_mask=None,
        labels: torch.Tensor | None = None,
    ) -> InterBertScoreOutput:
        if input_ids is None or input_ids.dim() != 3:
            raise ValueError("InterBertForMultipleChoice expects input_ids of shape batch x choices x tokens")
        b, c, _t = input_ids.shape

        def flat_text(t):
            return None if t is None else t.reshape(b * c, -1)

        def flat_regions(t, trailing: int):
            if t is None:
                return None
            if t.dim() == 1 + trailing:  # batch x ... : shared by all choices
                t = t.unsqueeze(1).expand(b, c, *t.shape[1:])
            return t.reshape(b * c, *t.shape[2:])

        logits, base = self.pair_scores(
            input_ids=flat_text(input_ids), attention_mask=flat_text(attention_mask), token_type_ids=flat_text(token_type_ids),
            region_features=flat_regions(region_features, 2), region_boxes=flat_regions(region_boxes, 2),
            region_mask=flat_regions(region_mask, 1),
        )
        logits = logits.view(b, c)
        loss = F.cross_entropy(logits, labels.long()) if labels is not None else None
        return InterBertScoreOutput(loss=loss, logits=logits, text_pooled=base.text_pooled, image_pooled=base.image_pooled)


class InterBertForSequenceClassification(InterBertPreTrainedModel):
    """Text-only tasks (GLUE-style) through the text path: no regions are needed.

    The classifier reads [CLS] through a BERT-style pooler (Linear + tanh) so that a model converted
    from BERT starts exactly where ``BertForSequenceClassification`` starts.
    """

    def __init__(self, config: InterBertConfig):
        super().__init__(config)
        self.interbert = InterBertModel(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _modules_without_loss(self) -> list[nn.Module]:
        # Text only: the image side is never run, and the classifier reads its own pooler, not text_pooler.
        base = self.interbert
        return [base.region_embeddings, base.image_stream, base.image_pooler, base.text_pooler,
                *super()._modules_without_loss()]

    def forward(
        self,
        input_ids=None, attention_mask=None, token_type_ids=None,
        labels: torch.Tensor | None = None,
    ) -> InterBertScoreOutput:
        if input_ids is None:
            raise ValueError("InterBertForSequenceClassification needs input_ids")
        # The classifier reads [CLS] only: the text stream's last layer computes that position alone.
        text, keep, _, _ = self.interbert.embed_inputs(input_ids, attention_mask, token_type_ids)
        base = self.interbert.encode(text, keep, None, None, text_needed=first_position(keep))
        pooled = torch.tanh(self.pooler(base.text_sequence[:, 0]))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
        return InterBertScoreOutput(loss=loss, logits=logits, text_pooled=base.text_pooled)


# Importing this module makes the transformers Auto classes load InterBERT folders (model_type "interbert"):
# AutoModel gives the encoder, the others the head of their name. The retrieval scorer has no Auto class
# whose contract fits (one matching logit per (image, text) pair): load it as
# InterBertForImageTextRetrieval.from_pretrained or interbert.load_model(folder, task="retrieval").
AutoModel.register(InterBertConfig, InterBertModel)
AutoModelForPreTraining.register(InterBertConfig, InterBertForPreTraining)
AutoModelForSequenceClassification.register(InterBertConfig, InterBertForSequenceClassification)
AutoModelForMultipleChoice.register(InterBertConfig, InterBertForMultipleChoice)


__all__ = [
    "InterBertConfig",
    "InterBertModel",
    "InterBertForPreTraining",
    "InterBertForImageTextRetrieval",
    "InterBertForMultipleChoice",
    "InterBertForSequenceClassification",
    "InterBertOutput",
    "InterBertPreTrainingOutput",
    "InterBertScoreOutput",
    "fuse",
    "mrm_loss",
    "contrastive_loss",
]
