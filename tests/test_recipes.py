"""Tests of binarize.recipes: the shipped recipes, strict loading, ``--set`` overrides and the YAML round trip."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

import binarize
from binarize.conversion.policy import Policy
from binarize.errors import ConfigError
from binarize.nn import DEFAULT_TAU, LayerOptions
from binarize.recipes import (
    DistillConfig,
    MethodConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    ScheduleConfig,
    StageConfig,
    TrainConfig,
    WeightDecayConfig,
    apply_overrides,
    dump_recipe,
    list_recipes,
    load_recipe,
    recipe_text,
)

SHIPPED = sorted(list_recipes())
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_shipped_recipes_are_listed():
    assert SHIPPED == [
        "cifar10-resnet18",
        "cifar10-resnet20",
        "cifar10-resnet20-posthoc",
        "cifar10-vgg-small",
        "imagenet-resnet18",
        "imagenet-resnet18-posthoc",
        "imagenet-resnet18-two-stage",
        "imagenet-resnet34",
    ]
    assert all(description.strip() and "\n" not in description for description in list_recipes().values())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_strictly_and_round_trips(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description == list_recipes()[name]
    # strict: the file's own mapping, read by Recipe.from_dict, gives the same recipe (no key was ignored)
    data = yaml.safe_load(recipe_text(name))
    assert Recipe.from_dict(data) == recipe
    assert set(data) <= {f.name for f in dataclasses.fields(Recipe)}
    # round trip: to_dict -> YAML -> from_dict, and the dumped form the engine writes beside a run
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    assert Recipe.from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe
    assert recipe.epochs == sum(s.epochs for s in recipe.stages) >= 1
    assert recipe.model.spec and recipe.data.dataset == "folder"


def test_the_paper_settings_of_the_shipped_recipes():
    """Spot checks against recu.md section 2 (z-hXu/ReCU's scripts)."""
    cifar = load_recipe("cifar10-resnet20")
    (stage,) = cifar.stages
    assert (stage.epochs, stage.batch_size, stage.optimizer.name, stage.optimizer.lr) == (600, 256, "sgd", 0.1)
    assert stage.optimizer.weight_decay == WeightDecayConfig(5e-4, 5e-4, 5e-4, 5e-4)
    assert (stage.schedule.name, stage.schedule.warmup_epochs, stage.distill.enabled) == ("cosine", 5, False)
    assert (cifar.method.tau_min, cifar.method.tau_max, cifar.policy.shortcuts) == (0.85, 0.99, "bireal")
    for name in ("imagenet-resnet18", "imagenet-resnet34"):  # one float 1x1 stride-2 downsample per block
        policy = load_recipe(name).policy
        assert (policy.shortcuts, policy.shortcut_downsample, policy.keep_shortcut_1x1) == ("bireal", "shared", True)
    two = load_recipe("imagenet-resnet18-two-stage")
    first, second = two.stages
    assert (first.binarize_weights, second.binarize_weights) == (False, True)
    assert first.optimizer.weight_decay.binary == 1e-5 and second.optimizer.weight_decay == WeightDecayConfig()
    for stage in two.stages:
        assert (stage.epochs, stage.batch_size, stage.optimizer.name, stage.optimizer.lr) == (256, 512, "adam", 1e-3)
        assert (stage.distill.teacher, stage.distill.teacher_pretrained, stage.distill.alpha) == (
            "torchvision:resnet34",
            True,
            1.0,
        )


def full_recipe() -> Recipe:
    """A recipe with a non-default value in every section (tuples, nested sections, None, two stages)."""
    return Recipe(
        name="everything",
        description="all sections changed",
        model=ModelConfig(spec="resnet18", weights="w.pt", num_classes=7),
        policy=Policy(keep=("layer4.*",), binarize=("re:.*proj$",), shortcuts="bireal", min_in_channels=4),
        data=binarize.data.DataConfig(input_size=(1, 28, 28), mean=(0.1, 0.2, 0.3), workers=0, val_split="test"),
        method=MethodConfig(tau_min=0.8, tau_max=0.95, granularity="step"),
        stages=(
            StageConfig(
                name="a",
                epochs=3,
                binarize_weights=False,
                optimizer=OptimizerConfig(name="sgd", lr=0.05, nesterov=True, weight_decay=WeightDecayConfig(1e-4)),
                schedule=ScheduleConfig(name="step", milestones=(1, 2), gamma=0.5),
                distill=DistillConfig(teacher="none"),
                label_smoothing=0.1,
            ),
            StageConfig(
                name="b",
                epochs=4,
                optimizer=OptimizerConfig(name="adamw", betas=(0.8, 0.99)),
                distill=DistillConfig(teacher="torchvision:resnet34", alpha=0.7, temperature=2.0),
                grad_clip=1.0,
            ),
        ),
        train=TrainConfig(seed=3, device="cpu", precision="bf16", channels_last=True, limit_train=100),
    )


def test_recipe_file_round_trip(tmp_path):
    recipe = full_recipe()
    data = recipe.to_dict()
    assert isinstance(data["stages"], list) and isinstance(data["policy"]["keep"], list)  # plain YAML types
    assert Recipe.from_dict(data) == recipe
    path = tmp_path / "everything.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe
    assert load_recipe(str(path)) == recipe
    # a file holding only some keys takes the defaults for the rest
    path.write_text("name: short\nstages:\n  - epochs: 2\n")
    short = load_recipe(path)
    assert short == Recipe(name="short", stages=(StageConfig(epochs=2),))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage:\n  - epochs: 1\n", r"Recipe: unknown key 'stage'; did you mean 'stages'\?"),
        ("stages:\n  - epoch: 1\n", r"stages\[0\]: unknown key 'epoch'; did you mean 'epochs'\?"),
        (
            "stages:\n  - {epochs: 1}\n  - optimizer: {lr: 0.1, wieght_decay: {binary: 0.1}}\n",
            r"stages\[1\]\.optimizer: unknown key 'wieght_decay'; did you mean 'weight_decay'\?",
        ),
        ("method: {tau_mni: 0.8}\n", r"method: unknown key 'tau_mni'; did you mean 'tau_min'\?"),
        ("train: {precision: bf61}\n", r"train\.precision: must be one of .*got 'bf61'; did you mean 'bf16'\?"),
        ("stages:\n  - epochs: three\n", r"stages\[0\]\.epochs: expected an integer, got 'three'"),
        ("stages:\n  - optimizer: {lr: -1}\n", r"stages\[0\]\.optimizer\.lr: must be > 0"),
        ("method: {tau_min: 0.3}\n", r"method\.tau_min: must lie in \[0\.5, 1\]"),
        ("stages: []\n", r"stages: a recipe needs at least one stage"),
        ("stages: [\n", r"not valid YAML"),
        ("- 1\n- 2\n", r"expected a mapping"),
        ("version: 2\n", r"version"),
    ],
)
def test_strict_loading_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_unknown_recipe_names_and_files():
    with pytest.raises(ConfigError, match=r"unknown recipe 'cifar10-resnet20-posthok'; did you mean 'cifar10-resnet20"):
        load_recipe("cifar10-resnet20-posthok")
    with pytest.raises(ConfigError, match=r"recipe file not found: .*missing\.yaml"):
        load_recipe("missing.yaml")


def test_overrides_by_dotted_path():
    recipe = load_recipe("cifar10-resnet20-posthoc")
    changed = apply_overrides(
        recipe,
        [
            "stages.0.optimizer.lr=0.01",
            "policy.shortcuts=none",
            "model.weights=null",
            "data.input_size=[3, 40, 40]",
            "train.channels_last=true",
            "stages.0.optimizer.weight_decay.float=1e-4",  # YAML 1.1 would read 1e-4 as a string
            "train.limit_train=",  # an empty value is null
        ],
    )
    assert changed.stages[0].optimizer.lr == 0.01
    assert changed.policy.shortcuts == "none" and changed.model.weights is None
    assert changed.data.input_size == (3, 40, 40) and changed.train.channels_last is True
    assert changed.stages[0].optimizer.weight_decay.float == 1e-4
    assert changed.train.limit_train is None
    assert changed.replace(
        stages=recipe.stages, policy=recipe.policy, data=recipe.data, train=recipe.train
    ) == recipe.replace(model=recipe.model.replace(weights=None))
    assert apply_overrides(recipe, []) is recipe
    assert load_recipe("cifar10-resnet20-posthoc", ["stages.0.epochs=2"]).stages[0].epochs == 2


def test_stage_wide_shorthand_applies_to_every_stage():
    two = load_recipe("imagenet-resnet18-two-stage")
    changed = apply_overrides(two, ["epochs=6", "distill.teacher=none", "batch_size=16", "optimizer.lr=2e-3"])
    for stage in changed.stages:
        assert (stage.epochs, stage.batch_size, stage.optimizer.lr) == (6, 16, 2e-3)
        assert stage.distill.teacher == "none" and not stage.distill.enabled
    assert changed.epochs == 12
    # everything else is untouched
    assert [s.binarize_weights for s in changed.stages] == [False, True]
    assert [s.optimizer.weight_decay for s in changed.stages] == [s.optimizer.weight_decay for s in two.stages]
    # a top-level key with a stage field's name stays top-level
    assert apply_overrides(two, ["name=renamed"]).stages[0].name == "binary-activations"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.optimizer.lrr=0.1", r"unknown key 'lrr'; did you mean 'lr'\?"),
        ("polcy.shortcuts=none", r"unknown key 'polcy'; did you mean 'policy'\?"),
        ("stages.3.epochs=1", r"'3' is not a valid index \(0 to 0\)"),
        ("stages.x.epochs=1", r"'x' is not a valid index"),
        ("train.seed.x=1", r"'train\.seed' is a value, not a section"),
        ("epochs=many", r"stages\[0\]\.epochs: expected an integer, got 'many'"),
        ("train.device=tpu", r"train\.device: must be auto, cpu, cuda or cuda:N"),
        ("stages.0.optimizer.name=sdg", r"did you mean 'sgd'\?"),
        ("distill.alpha=2", r"stages\[0\]\.distill\.alpha: must lie in \[0, 1\]"),
        ("epochs", r"--set takes key=value"),
        ("=3", r"--set takes key=value"),
        ("data.input_size=[3, 32", r"cannot parse the value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe("cifar10-resnet20-posthoc", [override])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------
# One owner per setting: the layer options, the stages and the tau schedule


def test_weight_binarization_is_switched_by_the_stages_only():
    two_stage = Recipe(stages=(StageConfig(binarize_weights=False), StageConfig()))
    assert two_stage.layer_options(0).binarize_weights is False and two_stage.layer_options(1).binarize_weights
    with pytest.raises(ConfigError, match=r"^layer\.binarize_weights: is false but stages\.0\.binarize_weights"):
        Recipe.from_dict({"layer": {"binarize_weights": False}})
    assert Recipe.from_dict({"layer": {"binarize_weights": False}, "stages": [{"binarize_weights": False}]})


def test_a_policy_setting_that_moved_says_where_it_went():
    with pytest.raises(ConfigError, match=r"^policy\.binarize_weights: this setting moved to the layer options"):
        Recipe.from_dict({"policy": {"binarize_weights": False}})
    assert load_recipe("cifar10-resnet20-posthoc", ["layer.activation_bias=true"]).layer_options().activation_bias


def test_the_tau_schedule_sets_tau():
    assert MethodConfig().tau_min == DEFAULT_TAU
    recipe = Recipe(method=MethodConfig(tau_min=0.9, tau_max=0.99))
    assert recipe.layer_options().tau == 0.9
    with pytest.raises(ConfigError, match=r"^layer\.tau: is 0\.95 but the tau schedule starts at method\.tau_min"):
        Recipe(layer=LayerOptions(tau=0.95))


@pytest.mark.parametrize(
    ("recipe", "override", "message", "valid_value"),
    [
        # a stage field is found beside the top-level keys (not 'policy')
        ("cifar10-resnet20-posthoc", "epochz=3", r"unknown key 'epochz'; did you mean 'epochs'\?$", "3"),
        # a field deeper in the recipe is suggested by its full path, and by its every-stage form
        (
            "cifar10-resnet20-posthoc",
            "lr=-1",
            r"unknown key 'lr'; did you mean 'optimizer\.lr' \(every stage\) or 'stages\.0\.optimizer\.lr'\?$",
            "0.01",
        ),
        (
            "imagenet-resnet18-two-stage",
            "stages.1.lr=1",
            r"unknown key 'lr'; did you mean 'optimizer\.lr' \(every stage\) or 'stages\.1\.optimizer\.lr'\?$",
            "0.01",
        ),
        ("cifar10-resnet20-posthoc", "seed=1", r"unknown key 'seed'; did you mean 'train\.seed'\?$", "1"),
        ("cifar10-resnet20-posthoc", "model.seed=1", r"unknown key 'seed'; did you mean 'train\.seed'\?$", "1"),
        ("cifar10-resnet20-posthoc", "wrkers=0", r"unknown key 'wrkers'; did you mean 'data\.workers'\?$", "0"),
        ("cifar10-resnet20-posthoc", "tau_mni=0.8", r"unknown key 'tau_mni'; did you mean 'method\.tau_min'\?$", "0.8"),
        ("cifar10-resnet20-posthoc", "policy.foo=0", r"unknown key 'foo'$", None),
    ],
)
def test_unknown_override_keys_point_at_the_field(recipe, override, message, valid_value):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(recipe, [override])
    assert str(err.value).startswith(f"--set {override}: ") and "\n" not in str(err.value)
    suggested = re.findall(r"'([\w.]+)'", str(err.value).partition("did you mean")[2])
    assert len(suggested) == (0 if valid_value is None else len(suggested)) and (valid_value is None) == (not suggested)
    for path in suggested:  # every suggestion works as given
        load_recipe(recipe, [f"{path}={valid_value}"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_text_points_at_nothing_users_lack(name):
    assert "../shared" not in recipe_text(name)  # the developers' shared folder is not the users'
