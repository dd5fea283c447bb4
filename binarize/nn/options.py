"""``LayerOptions``: the options of each binary layer that a conversion creates."""

from __future__ import annotations

import dataclasses

from binarize.config import Config, check

__all__ = ["DEFAULT_TAU", "LayerOptions"]

DEFAULT_TAU = 0.85
"""Initial tau: the start of the paper's schedule (``tau_min`` of Xu et al. 2021, section 3.4), so ReCU is
active even outside binarize's engine. The recipes' ``method.tau_min`` defaults to it."""


@dataclasses.dataclass(frozen=True)
class LayerOptions(Config):
    """How each :class:`~binarize.nn.ReCUConv2d` that a conversion creates is set up.

    :class:`~binarize.Policy` decides which layers become binary and which graph rewrites run; these
    options belong to the binary layer itself. During fine-tuning the stage's ``binarize_weights`` is
    the only switch of weight binarization and the tau schedule sets tau.

    Args:
        binarize_weights: False binarizes activations only (float weights): the first stage of
            two-stage training (ReActNet).
        activation_bias: Give each binary conv a learnable per-input-channel bias added before the
            sign of its input (a learnable threshold, ReActNet's RSign); off in the paper's settings.
        tau: The initial ReCU quantile tau of every layer.

    Example::

        >>> LayerOptions(binarize_weights=False).tau
        0.85
    """

    binarize_weights: bool = True
    activation_bias: bool = False
    tau: float = DEFAULT_TAU

    def validate(self) -> None:
        check(0.5 <= self.tau <= 1.0, "tau", f"must lie in [0.5, 1], got {self.tau}")
