"""The loop's settings (the ``train:`` section of every recipe config) and what a run returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interbert.utils import typed_config


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")  # train.compile: torch.compile's modes
CUDA_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # CUDA graphs / autotuned GPU kernels
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")  # train.report_to: where a run's numbers go


@dataclass
class TrainConfig:
    """Settings of the loop. Model, data and loss weights belong to the recipe, not here."""

    output_dir: str = "runs/train"
    seed: int = 0
    batch_size: int = 32  # examples per process per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer update
    max_steps: int | None = None  # optimizer updates; None -> num_epochs over the data
    num_epochs: int = 1
    learning_rate: float = 1e-4
    # fnmatch patterns on parameter names -> learning-rate factor; the first matching pattern wins,
    # e.g. {"interbert.text_stream.*": 0.1} trains those weights 10x slower (recipes: model.bert_lr_factor).
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01  # never applied to biases and LayerNorm weights (1-d parameters)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0  # linear warm-up; 0 -> warmup_ratio * total steps
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # None -> no clipping
    # Exponential moving average of the weights (the original fine-tunes with 0.9999); the averaged
    # weights are the ones evaluated and saved. ema_warmup uses min(decay, (1+n)/(10+n)) after n
    # updates, so a short run's average is not dominated by the initial weights.
    ema_decay: float | None = None
    ema_warmup: bool = True
    bf16: bool = True  # autocast to bfloat16 on CUDA; never on CPU (bf16 matmuls are ~100x slower there)
    # autocast to float16 with a dynamic loss scale (torch.amp.GradScaler), for GPUs without bf16 (V100, T4).
    # CUDA only: refused on CPU, and with bf16 (set train.bf16=false).
    fp16: bool = False
    # Recompute each transformer layer's activations in the backward pass instead of keeping them: less
    # memory for a slower step (the model must support it: transformers' gradient_checkpointing_enable).
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto -> cuda:LOCAL_RANK when available, else cpu
    save_every: int | None = None  # checkpoint every N updates (and always at the end)
    log_every: int = 10  # TensorBoard scalars every N updates
    eval_every: int | None = None  # call eval_fn every N updates (and after the last one)
    # Watching a run. best_metric: the eval_fn metric whose best value is kept in model_best/ (None: no
    # model_best); best_mode: max or min (None: min for names ending in "loss" or "rank", else max);
    # early_stopping_patience: end the run after this many evaluations without improvement (None: never).
    best_metric: str | None = None
    best_mode: str | None = None
    early_stopping_patience: int | None = None
    # None: one checkpoint.pt, overwritten. K: checkpoint-<step>.pt for the last K saves as well, with
    # checkpoint.pt the latest of them (what --resume reads).
    keep_checkpoints: int | None = None
    num_workers: int = 0  # DataLoader worker processes
    drop_last: bool = True  # drop the incomplete last batch of an epoch
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    # Debugging DDP: every rank writes its weights to rank_weights/rank{r}_step{n}.safetensors when fit
    # starts and when it ends, so that one can check the ranks stayed identical (tests do).
    save_rank_weights: bool = False
    progress_bar: bool = True
    tensorboard: bool = True  # the older switch for TensorBoard, read only while report_to is null
    # Where the run's hyperparameters (the resolved config), per-update scalars and validation metrics go, as
    # transformers' report_to: a list of tensorboard (under output_dir/tensorboard), wandb (W&B: WANDB_MODE,
    # WANDB_PROJECT apply; files under output_dir/wandb), mlflow (MLFLOW_TRACKING_URI, else a SQLite store under
    # output_dir/mlflow) or none; one name alone may be written without the list. null (the default): tensorboard
    # decides, as before report_to existed: true -> [tensorboard], false -> [none]. Once set, report_to decides
    # alone (train.report_to=[tensorboard] turns TensorBoard on in a config that says tensorboard: false). wandb
    # and mlflow are extras: pip install 'interbert[wandb]' / 'interbert[mlflow]'. Only rank 0 reports.
    report_to: list[str] | str | None = None
    # torch.compile the model for the step: off | default | reduce-overhead | max-autotune (the last two are
    # CUDA modes, refused on CPU). The model runs in its static-shape mode (no graph breaks, see
    # InterBertPreTrainedModel.set_static_shapes); with data.length_buckets the compiled graphs are static
    # (dynamic=False), one per bucket. The first step's extra time is reported as compile_seconds. Off by
    # default until an idle benchmark (benchmarks/compiled_step.py) says it pays.
    compile: str = typed_config.choice("off", COMPILE_MODES)

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum_steps", "num_epochs", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "eval_every", "early_stopping_patience", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value}")
        if self.best_mode not in (None, "max", "min"):
            raise ValueError(f"TrainConfig.best_mode must be max, min or None, got {self.best_mode!r}")
        # Without evaluations there is nothing to pick a best model by or to stop on; say so rather than
        # silently writing no model_best.
        for name in ("best_metric", "early_stopping_patience"):
            if getattr(self, name) is not None and self.eval_every is None:
                raise ValueError(f"TrainConfig.{name} needs eval_every (evaluations to compare)")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.fp16 and self.bf16:
            raise ValueError("TrainConfig.fp16 and bf16 are both on: choose one (train.bf16=false train.fp16=true)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.num_workers < 0 or self.warmup_steps < 0:
            raise ValueError("TrainConfig.num_workers and warmup_steps must be >= 0")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        self._check_report_to()
        for pattern, factor in self.lr_multipliers.items():
            if not isinstance(factor, int | float) or factor < 0:
                raise ValueError(f"TrainConfig.lr_multipliers[{pattern!r}] must be a number >= 0, got {factor!r}")

    def _check_report_to(self) -> None:
        if isinstance(self.report_to, str):  # train.report_to=wandb on the command line
            self.report_to = [self.report_to]
        if self.report_to is None:
            return
        for name in self.report_to:
            if name not in REPORT_TO:
                raise ValueError(f"report_to must list some of {', '.join(REPORT_TO)}; {name!r} is not one of them")
            if self.report_to.count(name) > 1:
                raise ValueError(f"report_to names {name} twice")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to lists none beside {', '.join(n for n in self.report_to if n != 'none')}: "
                             "choose none alone or the backends")

    def reporting_backends(self) -> list[str]:
        """The trackers the run reports to: ``report_to`` without ``none``, or, when it is not set,
        ``[tensorboard]`` if ``tensorboard`` is on (what the key meant before ``report_to`` existed)."""
        if self.report_to is None:
            return ["tensorboard"] if self.tensorboard else []
        return [name for name in self.report_to if name != "none"]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from a config file's ``train:`` section; an unknown key, or a value of the wrong type
        (``"yes"`` for a bool, ``1.5`` for an int), is a ConfigError (a ValueError) naming it. Ints are
        accepted as floats, paths as str (:mod:`interbert.utils.typed_config`)."""
        return typed_config.from_dict(cls, values, "train", source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_best_mode(self) -> str:
        """``best_mode``, or inferred from ``best_metric``'s name: losses and ranks are better low."""
        if self.best_mode is not None:
            return self.best_mode
        return "min" if (self.best_metric or "").endswith(("loss", "rank")) else "max"


@dataclass
class TrainResult:
    step: int  # optimizer updates done
    epoch: int
    history: dict[str, list[float | None]]  # "loss", each "*_loss" component, "lr", per update
    eval_history: list[dict[str, float]]  # one {"step": s, metric: value, ...} per evaluation
    output_dir: Path
    best: dict[str, Any] | None = None  # {"metric", "mode", "value", "step"} when best_metric is set
    stopped_early: bool = False
    # train.compile: the first micro-batch's time beyond the second's (compiling); None when not compiled
    compile_seconds: float | None = None

    @property
    def loss_history(self) -> list[float]:
        return self.history["loss"]
