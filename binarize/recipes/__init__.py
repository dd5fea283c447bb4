"""Recipes: a whole fine-tune (model, policy, data, method, stages) as one frozen configuration.

A recipe file is the YAML rendering of :class:`Recipe`: keys the file leaves out take the defaults
below, and an unknown or misspelt key is an error naming the nearest valid key. The recipes that
ship with binarize live in the package (``binarize recipes`` lists them); :func:`load_recipe` takes
a shipped name or a path. :func:`apply_overrides` changes fields by dotted path (the CLI's
``--set stages.0.optimizer.lr=0.01``), validated like the file. The engine writes the resolved
recipe next to every run.
"""

from binarize.recipes.loading import apply_overrides, dump_recipe, list_recipes, load_recipe, recipe_text
from binarize.recipes.schema import (
    BlockReconstructionConfig,
    DistillConfig,
    FeatureDistillConfig,
    MethodConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    ScheduleConfig,
    StageConfig,
    TrainConfig,
    WeightDecayConfig,
)

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
    "load_recipe",
    "list_recipes",
    "recipe_text",
    "apply_overrides",
    "dump_recipe",
]
