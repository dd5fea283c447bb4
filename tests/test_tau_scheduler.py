"""Tests of binarize.engine.tau_scheduler.TauScheduler against ReCU's schedule formula written out here,
per epoch and per step, its state round trip, argument errors, and models inside DDP / compile wrappers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import binarize
from binarize.engine.tau_scheduler import TauScheduler
from binarize.errors import ConfigError
from binarize.nn import ReCUConv2d


def formula(t: float, epochs: int, tau_min: float = 0.85, tau_max: float = 0.99) -> float:
    """ReCU eq. 24: tau(t) = A e^(t/T) + B, A = (tau_max - tau_min) / (e - 1), B = tau_min - A."""
    a = (tau_max - tau_min) / (math.e - 1)
    return a * math.exp(t / epochs) + tau_min - a


def model_taus(model: nn.Module) -> list[float]:
    return [m.tau.item() for m in model.modules() if isinstance(m, ReCUConv2d)]


def f32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


class Net(nn.Module):
    """Three ReCU layers, one of them with float weights (stage 1 of two-stage training): all get tau."""

    def __init__(self) -> None:
        super().__init__()
        self.a = ReCUConv2d(8, 8, 3, padding=1)
        self.b = nn.Sequential(ReCUConv2d(8, 8, 3, padding=1), nn.ReLU())
        self.c = ReCUConv2d(8, 8, 3, padding=1, binarize_weights=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_construction_sets_tau_min_on_every_layer():
    model = Net()
    for m in model.modules():
        if isinstance(m, ReCUConv2d):
            m.tau.fill_(0.5)
    scheduler = TauScheduler(model, 10, tau_min=0.9, tau_max=0.95)
    assert scheduler.tau == scheduler.get_tau() == pytest.approx(0.9, abs=1e-15)
    assert model_taus(model) == [f32(0.9)] * 3


@pytest.mark.parametrize(("epochs", "tau_min", "tau_max"), [(5, 0.85, 0.99), (3, 0.9, 1.0), (1, 0.85, 0.85)])
def test_per_epoch_follows_the_formula(epochs, tau_min, tau_max):
    model = Net()
    scheduler = TauScheduler(model, epochs, tau_min=tau_min, tau_max=tau_max)
    seen = [scheduler.tau]
    for _ in range(epochs + 2):  # two steps past the end: tau stays at tau_max
        scheduler.step()
        seen.append(scheduler.tau)
        assert model_taus(model) == [f32(scheduler.tau)] * 3
    expected = [formula(min(t, epochs), epochs, tau_min, tau_max) for t in range(epochs + 3)]
    assert seen == pytest.approx(expected, abs=1e-15)
    assert seen[0] == pytest.approx(tau_min) and seen[epochs] == pytest.approx(tau_max) == seen[-1]


def test_the_formula_is_that_of_the_engine():
    from binarize.engine.schedules import tau_at
    from binarize.recipes import MethodConfig

    scheduler = TauScheduler(Net(), 7, tau_min=0.8, tau_max=0.97)
    for t in range(8):
        assert scheduler.tau == tau_at(t, 7, MethodConfig(tau_min=0.8, tau_max=0.97))
        scheduler.step()


def test_per_step_follows_the_formula_with_fractional_epochs():
    model = Net()
    scheduler = TauScheduler(model, 3, per_step=True, steps_per_epoch=4)
    for step in range(15):
        t = min(step / 4, 3.0)
        assert scheduler.progress == t
        assert scheduler.tau == pytest.approx(formula(t, 3), abs=1e-15)
        assert model_taus(model) == [f32(formula(t, 3))] * 3
        scheduler.step()
    assert scheduler.tau == pytest.approx(0.99)


def test_tau_is_filled_in_place():
    model = Net()
    buffers = [m.tau for m in model.modules() if isinstance(m, ReCUConv2d)]
    pointers = [b.data_ptr() for b in buffers]
    scheduler = TauScheduler(model, 4)
    scheduler.step()
    after = [m.tau for m in model.modules() if isinstance(m, ReCUConv2d)]
    assert all(a is b for a, b in zip(after, buffers, strict=True))
    assert [b.data_ptr() for b in after] == pointers
    assert all(b.shape == () and b.dtype == torch.float32 for b in after)


def test_state_round_trip_continues_exactly(tmp_path):
    straight_model, resumed_model = Net(), Net()
    straight = TauScheduler(straight_model, 3, per_step=True, steps_per_epoch=5)
    first = TauScheduler(resumed_model, 3, per_step=True, steps_per_epoch=5)
    expected = []
    for _ in range(12):
        straight.step()
        expected.append(straight.tau)
    for _ in range(7):
        first.step()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed_model = Net()  # a fresh process: new layers at the default tau
    second = TauScheduler(resumed_model, 3, per_step=True, steps_per_epoch=5)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert second.tau == expected[6] and model_taus(resumed_model) == [f32(expected[6])] * 3
    for i in range(7, 12):
        second.step()
        assert second.tau == expected[i]


def test_a_resumed_run_may_be_longer():
    first = TauScheduler(Net(), 3)
    first.step()
    longer = TauScheduler(Net(), 6)
    longer.load_state_dict(first.state_dict())
    assert longer.progress == 1 and longer.tau == pytest.approx(formula(1, 6))


@pytest.mark.parametrize(
    ("saved", "now"),
    [({"per_step": False}, {"per_step": True, "steps_per_epoch": 4}), ({"per_step": True, "steps_per_epoch": 4}, {})],
)
def test_loading_a_state_that_counts_differently_is_an_error(saved, now):
    state = TauScheduler(Net(), 3, **saved).state_dict()
    with pytest.raises(ConfigError, match="^per_step: the saved tau schedule counted"):
        TauScheduler(Net(), 3, **now).load_state_dict(state)
    other = TauScheduler(Net(), 3, per_step=True, steps_per_epoch=5)
    with pytest.raises(ConfigError, match="steps_per_epoch=4"):
        other.load_state_dict(TauScheduler(Net(), 3, per_step=True, steps_per_epoch=4).state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs: must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "epochs: must be an integer >= 1, got 2.5"),
        ({"epochs": True}, "epochs: must be an integer >= 1, got True"),
        ({"tau_min": 0.4}, "tau_min: must lie in [0.5, 1], got 0.4"),
        ({"tau_min": 0.9, "tau_max": 0.8}, "tau_max: must lie in [tau_min, 1], got 0.8"),
        ({"tau_max": 1.2}, "tau_max: must lie in [tau_min, 1], got 1.2"),
        ({"per_step": True}, "steps_per_epoch: per_step=True needs it (e.g. len(train_loader))"),
        ({"per_step": True, "steps_per_epoch": 0}, "steps_per_epoch: must be an integer >= 1, got 0"),
    ],
)
def test_argument_errors_are_one_line(kwargs, message):
    kwargs = {"epochs": 5, **kwargs}
    epochs = kwargs.pop("epochs")
    with pytest.raises(ConfigError) as info:
        TauScheduler(Net(), epochs, **kwargs)
    assert str(info.value) == message


def test_a_model_without_recu_layers_is_an_error():
    with pytest.raises(ConfigError, match="^model: it has no ReCUConv2d layer; pass the model binarize.convert"):
        TauScheduler(nn.Conv2d(3, 8, 3), 5)


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("how", ["dataparallel", "compile", "ddp", "compile+ddp"])
def test_wrapped_models(how, request):
    if "ddp" in how:
        request.getfixturevalue("process_group")
    torch.manual_seed(0)
    float_model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    model = binarize.convert(float_model, example_inputs=torch.zeros(1, 3, 8, 8))
    wrapped = {
        "dataparallel": lambda m: nn.DataParallel(m),
        "compile": lambda m: torch.compile(m),
        "ddp": lambda m: nn.parallel.DistributedDataParallel(m),
        "compile+ddp": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m)),
    }[how](model)
    scheduler = TauScheduler(wrapped, 4)
    assert len(scheduler.layers) == 1 and scheduler.layers[0] is model.get_submodule("3")
    scheduler.step()
    assert model_taus(model) == [f32(formula(1, 4))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_does_not_synchronise_with_the_device():
    model = Net().cuda()
    scheduler = TauScheduler(model, 5, per_step=True, steps_per_epoch=10)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model_taus(model) == [f32(formula(2, 5))] * 3
