"""Parameter groups by role and the optimizer of a stage.

Roles come from the module that owns a parameter, never from its name: the latent weights of
:class:`~binarize.nn.ReCUConv2d` (``binary``), their scales ``alpha`` (``scale``), normalisation
parameters and every bias (``norm_bias``), and the weights of every other layer (``float``). Each role
gets its own weight decay (the paper's code decays by name substring, which misses or catches
layers by accident).
"""

from __future__ import annotations

import torch
from torch import nn

from binarize.nn import ReCUConv2d
from binarize.recipes import OptimizerConfig

__all__ = ["ROLES", "parameter_roles", "build_optimizer"]

ROLES = ("binary", "scale", "norm_bias", "float")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``model`` sorted into :data:`ROLES` (each parameter once)."""
    groups: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, ReCUConv2d) and name == "weight":
                role = "binary"
            elif isinstance(module, ReCUConv2d) and name == "alpha":
                role = "scale"
            elif isinstance(module, _NORMS) or name == "bias" or param.dim() <= 1:
                role = "norm_bias"
            else:
                role = "float"
            groups[role].append(param)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over the role groups, each with its weight decay; ``lr`` is set per step."""
    roles = parameter_roles(model)
    groups = [
        {"params": params, "weight_decay": getattr(cfg.weight_decay, role), "role": role}
        for role, params in roles.items()
        if params
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    optimizer = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=cfg.lr, betas=cfg.betas)
