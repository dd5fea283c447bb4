"""``TauScheduler``: ReCU's tau schedule for your own training loop, shaped like torch's LR schedulers."""

from __future__ import annotations

from typing import Any

from torch import nn

from binarize._utils import unwrap
from binarize.engine.schedules import tau_at
from binarize.errors import ConfigError
from binarize.nn import ReCUConv2d
from binarize.recipes import MethodConfig

__all__ = ["TauScheduler"]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be an integer >= 1, got {value!r}")
    return value


class TauScheduler:
    """Sets ReCU's tau on every binary layer: ``tau(t) = A e^(t/T) + B`` (Xu et al. 2021, eq. 24).

    ``A = (tau_max - tau_min) / (e - 1)``, ``B = tau_min - A`` (:func:`binarize.engine.schedules.tau_at`),
    ``T = epochs`` and ``t`` the epochs done: an integer per epoch (the paper's code), a fraction of
    epochs with ``per_step``. Construction sets ``tau(0) = tau_min``; each :meth:`step` advances ``t``
    by one epoch, or by ``1 / steps_per_epoch`` with ``per_step`` (call it after ``optimizer.step()``).
    ``t`` stops at ``T``, so tau never passes ``tau_max``. Every layer's ``tau`` buffer is filled in
    place: no reallocation, no host synchronisation.

    Args:
        model: The converted model (DDP and ``torch.compile`` wrappers are unwrapped); its
            ``ReCUConv2d`` layers are collected once, here.
        epochs: ``T``, the epochs of the schedule.
        tau_min: tau at the start.
        tau_max: tau at ``t = T``.
        per_step: Advance per optimizer step instead of per epoch.
        steps_per_epoch: Optimizer steps per epoch; needed with ``per_step``.

    Raises:
        ConfigError: An argument out of range, or a model without ReCU layers.

    Example::

        >>> scheduler = TauScheduler(binary, epochs=5)   # every layer now has tau = 0.85
        >>> for epoch in range(5):
        ...     train_one_epoch(binary)
        ...     scheduler.step()
    """

    def __init__(
        self,
        model: nn.Module,
        epochs: int,
        *,
        tau_min: float = 0.85,
        tau_max: float = 0.99,
        per_step: bool = False,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.epochs = _positive_int(epochs, "epochs")
        self.method = MethodConfig(tau_min=tau_min, tau_max=tau_max, granularity="step" if per_step else "epoch")
        self.per_step = bool(per_step)
        if per_step and steps_per_epoch is None:
            raise ConfigError("steps_per_epoch: per_step=True needs it (e.g. len(train_loader))")
        self.steps_per_epoch = None if steps_per_epoch is None else _positive_int(steps_per_epoch, "steps_per_epoch")
        self.layers = [m for m in unwrap(model).modules() if isinstance(m, ReCUConv2d)]
        if not self.layers:
            raise ConfigError("model: it has no ReCUConv2d layer; pass the model binarize.convert returned")
        self.count = 0
        self._apply()

    @property
    def progress(self) -> float:
        """``t``, the epochs done (fractional with ``per_step``), at most ``epochs``."""
        t = self.count / self.steps_per_epoch if self.per_step else float(self.count)
        return min(t, float(self.epochs))

    def get_tau(self) -> float:
        """The current tau, the value every layer holds."""
        return tau_at(self.progress, self.epochs, self.method)

    @property
    def tau(self) -> float:
        """The current tau (as :meth:`get_tau`)."""
        return self.get_tau()

    def step(self) -> None:
        """Advances by one epoch (or one optimizer step with ``per_step``) and sets the new tau."""
        self.count += 1
        self._apply()

    def _apply(self) -> None:
        tau = self.get_tau()
        for layer in self.layers:
            layer.tau.fill_(tau)

    def state_dict(self) -> dict[str, Any]:
        """The position (``count`` steps taken) and how it counts, for a checkpoint."""
        return {"count": self.count, "per_step": self.per_step, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`state_dict` and sets that tau on every layer.

        ``epochs``, ``tau_min`` and ``tau_max`` stay those given to the constructor (a resumed run may be
        longer); the saved state must count the same way (``per_step`` and ``steps_per_epoch``).

        Raises:
            ConfigError: The state counted epochs where this scheduler counts steps, or another step size.
        """
        same_steps = not self.per_step or state["steps_per_epoch"] == self.steps_per_epoch
        if bool(state["per_step"]) != self.per_step or not same_steps:
            raise ConfigError(
                f"per_step: the saved tau schedule counted {'steps' if state['per_step'] else 'epochs'}"
                f" (steps_per_epoch={state['steps_per_epoch']}); construct the TauScheduler with the same settings"
            )
        self.count = int(state["count"])
        self._apply()
