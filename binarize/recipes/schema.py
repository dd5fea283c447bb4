"""The recipe schema: a whole fine-tune (model, policy, data, method, stages, train) as frozen configurations."""

from __future__ import annotations

import dataclasses
from typing import Literal

from binarize.config import Config, check
from binarize.conversion.policy import Policy
from binarize.data import DataConfig
from binarize.nn.options import DEFAULT_TAU, LayerOptions

__all__ = [
    "ModelConfig",
    "MethodConfig",
    "WeightDecayConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "DistillConfig",
    "FeatureDistillConfig",
    "BlockReconstructionConfig",
    "StageConfig",
    "TrainConfig",
    "Recipe",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig(Config):
    """The float model to start from.

    Args:
        spec: ``NAME`` (timm), ``torchvision:NAME`` or ``FILE.py:FACTORY`` (see :mod:`binarize.models`);
            None when the caller passes a model.
        weights: A weights file to load into it (the user's pretrained float model).
        pretrained: Download the timm/torchvision pretrained weights instead.
        num_classes: Output classes; None keeps the model's (checked against the dataset).
    """

    spec: str | None = None
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None

    def validate(self) -> None:
        check(self.num_classes is None or self.num_classes >= 1, "num_classes", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MethodConfig(Config):
    """ReCU's tau schedule (Xu et al. 2021, section 3.4): ``tau(t) = A e^(t/T) + B``.

    ``A = (tau_max - tau_min) / (e - 1)`` and ``B = tau_min - A``, so tau grows exponentially from
    ``tau_min`` at the start of a stage towards ``tau_max``.

    Args:
        tau_min: tau at the start (the official code: 0.85).
        tau_max: tau at the end of the schedule (0.99).
        granularity: ``epoch`` (tau constant within an epoch, t = epoch index, as the paper's code)
            or ``step`` (t = fractional epoch, updated every step).
    """

    tau_min: float = DEFAULT_TAU
    tau_max: float = 0.99
    granularity: Literal["epoch", "step"] = "epoch"

    def validate(self) -> None:
        check(0.5 <= self.tau_min <= 1.0, "tau_min", f"must lie in [0.5, 1], got {self.tau_min}")
        check(self.tau_min <= self.tau_max <= 1.0, "tau_max", f"must lie in [tau_min, 1], got {self.tau_max}")


@dataclasses.dataclass(frozen=True)
class WeightDecayConfig(Config):
    """Weight decay per parameter role (roles come from the module types, never from names).

    Args:
        binary: Latent weights of binary convolutions.
        scale: The per-channel scales ``alpha`` of binary convolutions.
        norm_bias: Normalisation parameters and every bias.
        float: Weights of the layers that stay float (stem, head, shortcuts, ...).
    """

    binary: float = 0.0
    scale: float = 0.0
    norm_bias: float = 0.0
    float: float = 0.0

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            check(getattr(self, f.name) >= 0, f.name, "weight decay must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Config):
    """Optimizer of a stage.

    Args:
        name: ``sgd`` (with momentum), ``adam`` or ``adamw``.
        lr: Peak learning rate (after warm-up).
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        betas: Adam/AdamW betas.
        weight_decay: Weight decay per parameter role.
    """

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: WeightDecayConfig = WeightDecayConfig()

    def validate(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must lie in [0, 1), got {self.momentum}")
        check(all(0 <= b < 1 for b in self.betas), "betas", f"must lie in [0, 1), got {self.betas}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(Config):
    """Learning-rate schedule of a stage, a pure function of the step.

    Args:
        name: ``cosine`` (to ``min_lr`` at the end), ``step`` (times ``gamma`` at each milestone
            epoch) or ``constant``.
        warmup_epochs: Linear warm-up from ``lr / (warmup steps)`` to ``lr`` over this many epochs.
        min_lr: Final learning rate of the cosine schedule.
        milestones: Epochs at which the step schedule multiplies the rate by ``gamma``.
        gamma: Factor of the step schedule.
    """

    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def validate(self) -> None:
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.min_lr >= 0, "min_lr", "must be >= 0")
        check(0 < self.gamma <= 1, "gamma", f"must lie in (0, 1], got {self.gamma}")
        check(list(self.milestones) == sorted(self.milestones), "milestones", "must be increasing")


@dataclasses.dataclass(frozen=True)
class DistillConfig(Config):
    """Knowledge distillation of a stage.

    The loss is ``alpha * soft_ce + (1 - alpha) * label_ce`` where ``soft_ce`` is the cross-entropy
    between the teacher's softmax and the student's log-softmax at ``temperature`` (ReActNet's
    distribution loss, used by ReCU's two-stage recipe).

    Args:
        teacher: ``float`` (the user's float model before conversion), ``none`` (labels only), or a
            model specification such as ``torchvision:resnet34``.
        teacher_weights: Weights file for a teacher given by specification.
        teacher_pretrained: Download pretrained weights for a teacher given by specification.
        alpha: Share of the distillation loss (1: no label loss).
        temperature: Softmax temperature of both distributions.
    """

    teacher: str = "float"
    teacher_weights: str | None = None
    teacher_pretrained: bool = False
    alpha: float = 1.0
    temperature: float = 1.0

    def validate(self) -> None:
        check(self.teacher.strip() != "", "teacher", "give float, none or a model specification")
        check(0 <= self.alpha <= 1, "alpha", f"must lie in [0, 1], got {self.alpha}")
        check(self.temperature > 0, "temperature", "must be > 0")

    @property
    def enabled(self) -> bool:
        return self.teacher != "none" and self.alpha > 0


@dataclasses.dataclass(frozen=True)
class FeatureDistillConfig(Config):
    """Block-wise feature distillation from the float teacher (:mod:`binarize.engine.feature_distill`).

    The loss of a step becomes ``logit/label loss + weight * mean over layers of feature_loss``.

    Args:
        weight: Weight of the feature loss; 0 turns it off.
        layers: Glob patterns of the modules whose outputs are matched, in student and teacher alike
            (the student is the converted teacher, with the same module names), e.g. ``layer*.*.relu2``.
        loss: ``mse`` (squared error relative to the teacher's energy, per layer) or ``attention``
            (Real-to-Binary's attention maps, Martinez et al., ICLR 2020).
    """

    weight: float = 0.0
    layers: tuple[str, ...] = ()
    loss: Literal["mse", "attention"] = "mse"

    def validate(self) -> None:
        check(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        _check_patterns(self.layers)
        check(self.weight == 0 or bool(self.layers), "layers", 'name the modules to match, e.g. ["layer*.*.relu2"]')

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclasses.dataclass(frozen=True)
class BlockReconstructionConfig(Config):
    """Block reconstruction at the start of a stage (:mod:`binarize.engine.feature_distill`, teacher forcing).

    For the first ``fraction`` of the stage's steps, every block of the student receives the float
    teacher's input at the named boundary modules and learns, locally and all blocks in parallel, to
    reproduce the teacher's block output (block reconstruction as in BRECQ, Li et al., ICLR 2021);
    the loss is the mean over the boundaries of ``loss`` between the boundary modules' inputs, with no
    logit or label loss. Then the optimizer state is reset and the rest of the stage trains end to end
    as configured. Each of the two phases runs the stage's learning-rate schedule (warm-up included)
    over its own steps; tau follows the stage's schedule throughout.

    Args:
        fraction: Share of the stage's steps spent on block reconstruction, in ``[0, 1)``; 0 turns it off.
        layers: Glob patterns of the block-boundary modules, present in student and teacher alike,
            e.g. ``layer*.*.relu2`` (each residual block's final activation).
        loss: ``mse`` (relative squared error) or ``attention``.
    """

    fraction: float = 0.0
    layers: tuple[str, ...] = ()
    loss: Literal["mse", "attention"] = "mse"

    def validate(self) -> None:
        check(0 <= self.fraction < 1, "fraction", f"must lie in [0, 1), got {self.fraction}")
        _check_patterns(self.layers)
        check(self.fraction == 0 or bool(self.layers), "layers", 'name the block boundaries, e.g. ["layer*.*.relu2"]')

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


def _check_patterns(layers: tuple[str, ...]) -> None:
    check(isinstance(layers, tuple), "layers", "expected a list of module name patterns")
    for pattern in layers:
        check(isinstance(pattern, str) and pattern.strip() != "", "layers", f"non-empty patterns, got {pattern!r}")


@dataclasses.dataclass(frozen=True)
class StageConfig(Config):
    """One training stage; a later stage starts from the previous one's weights.

    Args:
        name: Shown in logs and metrics.
        epochs: Epochs of this stage.
        batch_size: Images per step (per process under torchrun).
        binarize_weights: False trains with binary activations and float weights (stage 1 of
            ReActNet-style two-stage training).
        optimizer: Optimizer settings.
        schedule: Learning-rate schedule.
        distill: Distillation settings.
        feature_distill: Block-wise feature distillation from the float teacher (a recovery option).
        block_reconstruction: Teacher-forced block reconstruction for the first part of the stage
            (a recovery option).
        label_smoothing: Label smoothing of the label loss.
        grad_clip: Clip the gradient norm to this value; None does not clip.
    """

    name: str = "main"
    epochs: int = 10
    batch_size: int = 128
    binarize_weights: bool = True
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    distill: DistillConfig = DistillConfig()
    feature_distill: FeatureDistillConfig = FeatureDistillConfig()
    block_reconstruction: BlockReconstructionConfig = BlockReconstructionConfig()
    label_smoothing: float = 0.0
    grad_clip: float | None = None

    def validate(self) -> None:
        for name in ("feature_distill", "block_reconstruction"):
            check(
                not getattr(self, name).enabled or self.distill.teacher != "none",
                name,
                "needs a teacher: set distill.teacher to float (the converted model's own float model)",
            )
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must lie in [0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How the run executes (not what it learns).

    Args:
        seed: Seed of data order, augmentation and initialisation; runs are reproducible on the CPU.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast with a gradient scaler);
            ``auto`` picks bf16 on CUDA and fp32 on the CPU.
        channels_last: Use the channels-last memory format.
        compile: Compile the student with ``torch.compile``.
        bn_calibration_batches: Batches used to re-estimate BatchNorm statistics right after conversion.
        log_every: Steps between progress updates (each reads the loss back from the device).
        limit_train: Train on a seeded, class-balanced subset of this many images.
        diagnostics: Write the dead-weight diagnostics of every binary layer to ``diagnostics.jsonl``
            after conversion and after every epoch (docs/diagnostics.md; a few extra passes per epoch).
        diagnostics_batches: Validation batches that measure the activation saturation (0: none).
        limit_val: Validate every epoch on a seeded, class-balanced subset of this many images
            (the same images whatever ``seed``).
        calibrate_thresholds: A recovery option: after the BatchNorm re-estimation of a fresh run, set
            every binary conv's activation bias (``layer.activation_bias: true``) so that the sign of
            each input channel is the binary indicator most correlated with the ReLU the float model
            applied there (:func:`binarize.calibrate_thresholds`), then re-estimate BatchNorm again.
        bn_refresh_batches: A recovery option: after each epoch's training, re-estimate the BatchNorm
            statistics on this many training batches (an exact average with the final weights, instead
            of the running average over the epoch's changing weights) before validation; 0 does not.
    """

    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    bn_calibration_batches: int = 50
    log_every: int = 20
    limit_train: int | None = None
    limit_val: int | None = None
    diagnostics: bool = True
    diagnostics_batches: int = 4
    calibrate_thresholds: bool = False
    bn_refresh_batches: int = 0

    def validate(self) -> None:
        ok = self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        check(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(self.bn_calibration_batches >= 0, "bn_calibration_batches", "must be >= 0")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.limit_train is None or self.limit_train >= 1, "limit_train", "must be >= 1 or null")
        check(self.limit_val is None or self.limit_val >= 1, "limit_val", "must be >= 1 or null")
        check(self.diagnostics_batches >= 0, "diagnostics_batches", "must be >= 0")
        check(self.bn_refresh_batches >= 0, "bn_refresh_batches", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Recipe(Config):
    """A complete fine-tune.

    Args:
        name: Short name.
        description: One line shown by ``binarize recipes``.
        model: The float model (overridable from the CLI).
        policy: Which layers become binary and which graph rewrites run.
        layer: The options of the binary layers. During training the stages switch weight
            binarization (``stages.N.binarize_weights``) and the tau schedule sets tau (``method``): a
            ``layer.binarize_weights: false`` or a ``layer.tau`` that disagrees with the first stage or
            the schedule is an error; ``layer.activation_bias`` is free.
        data: Dataset and transforms.
        method: ReCU's tau schedule.
        stages: One or more training stages.
        train: Execution settings.
        version: Schema version.
    """

    name: str = "custom"
    description: str = ""
    model: ModelConfig = ModelConfig()
    policy: Policy = Policy()
    layer: LayerOptions = LayerOptions()
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    train: TrainConfig = TrainConfig()
    version: int = 1

    def validate(self) -> None:
        check(len(self.stages) >= 1, "stages", "a recipe needs at least one stage")
        check(self.version == 1, "version", f"this binarize reads recipe version 1, got {self.version}")
        first = self.stages[0].binarize_weights
        check(  # the default (true) defers to the stages; false is a request that the first stage must share
            self.layer.binarize_weights or not first,
            "layer.binarize_weights",
            f"is {_yaml(self.layer.binarize_weights)} but stages.0.binarize_weights is {_yaml(first)}; during "
            "training the stage setting is the only switch: set stages.N.binarize_weights and leave this out",
        )
        check(
            self.layer.tau in (DEFAULT_TAU, self.method.tau_min),
            "layer.tau",
            f"is {self.layer.tau} but the tau schedule starts at method.tau_min = {self.method.tau_min}; during "
            "training the schedule sets tau: set method.tau_min and leave this out",
        )
        check(
            not self.train.calibrate_thresholds or self.layer.activation_bias,
            "train.calibrate_thresholds",
            "initialises the activation bias: set layer.activation_bias: true as well",
        )

    def layer_options(self, stage: int = 0) -> LayerOptions:
        """The layer options a conversion for this recipe uses, with stage ``stage``'s weight binarization
        and the schedule's first tau."""
        return self.layer.replace(binarize_weights=self.stages[stage].binarize_weights, tau=self.method.tau_min)

    @property
    def epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


def _yaml(value: bool) -> str:
    return "true" if value else "false"
