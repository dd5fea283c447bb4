"""Tests that ``binarize.nn.ReCUConv2d`` implements ReCU (Xu et al., ICCV 2021) exactly as specified.

The float64 reference in ``tests/reference_recu.py`` is written from the spec only, with plain autograd; every
numeric test compares the layer (outputs and all gradients) with it to 1e-9 relative error
(``max|layer - ref| / max|ref|``). The remaining tests cover exact zeros, properties (Hypothesis), host
synchronisation, bf16 autocast, channels_last, torch.compile, the ``tau`` buffer, weight-float mode and
``from_float``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_recu import WEIGHT_SCALE, RefStats, reference_conv, sign_pm1
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from binarize.nn import LayerOptions, ReCUConv2d

REL_TOL = 1e-9
TAUS = [0.6, 0.85, 0.95, 0.99, 1.0]


# ----------------------------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class Case:
    """One convolution configuration of the reference grid."""

    in_channels: int
    out_channels: int
    kernel: int | tuple[int, int]
    size: tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    batch: int = 2

    def id(self) -> str:
        """Short test id."""
        k = self.kernel if isinstance(self.kernel, int) else "x".join(map(str, self.kernel))
        return (
            f"{self.in_channels}-{self.out_channels}-k{k}-{self.size[0]}x{self.size[1]}-s{self.stride}-p{self.padding}"
            f"-d{self.dilation}-g{self.groups}-{'b' if self.bias else 'nb'}-{self.padding_mode}-n{self.batch}"
        )


CASES = [
    Case(4, 6, 3, (7, 9), padding=1),
    Case(4, 8, 1, (5, 6), bias=False, batch=3),
    Case(4, 4, 5, (9, 8), stride=2, padding=2),
    Case(8, 8, 3, (8, 7), stride=2, padding=1, dilation=2, groups=2, bias=False),
    Case(8, 8, 3, (6, 9), padding=1, groups=8),  # depthwise
    Case(8, 12, 3, (7, 7), padding=2, dilation=2, groups=4, batch=1),
    Case(4, 8, 1, (6, 5), stride=2, groups=2),
    Case(3, 5, (1, 3), (6, 8), stride=(1, 2), padding=(0, 1)),
    Case(6, 6, 5, (10, 11), stride=2, padding=2, dilation=2, groups=2, bias=False),
]
PAD_MODE_CASES = [
    Case(4, 6, 3, (7, 9), padding=1, padding_mode="reflect"),
    Case(8, 8, 5, (8, 10), stride=2, padding=2, groups=4, bias=False, padding_mode="reflect"),
    Case(4, 6, 3, (6, 7), padding=1, padding_mode="replicate"),
    Case(4, 4, 3, (6, 7), padding=(1, 2), dilation=2, padding_mode="circular"),
]


def _laplace(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """Laplace(0, 1) samples, so the ReCU mask clips a sizeable share at every tested tau."""
    mag = torch.empty(shape, dtype=dtype).exponential_(generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen).to(dtype) * 2 - 1
    return mag * sign


def make_layer(case: Case, tau: float, seed: int, dtype: torch.dtype = torch.float64, **kwargs) -> ReCUConv2d:
    """A layer with Laplace latent weights (per-channel offsets), random signed alpha and bias."""
    gen = torch.Generator().manual_seed(seed)
    layer = ReCUConv2d(
        case.in_channels,
        case.out_channels,
        case.kernel,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        bias=case.bias,
        padding_mode=case.padding_mode,
        **kwargs,
    ).to(dtype)
    with torch.no_grad():
        w = layer.weight
        offsets = torch.randn((w.shape[0], 1, 1, 1), generator=gen, dtype=torch.float64) * 0.05
        layer.weight.copy_(_laplace(tuple(w.shape), gen) * 0.03 + offsets)
        alpha = torch.rand(w.shape[0], generator=gen, dtype=torch.float64) + 0.5
        alpha[::3] *= -1  # alpha is unconstrained and may be negative
        layer.alpha.copy_(alpha)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(w.shape[0], generator=gen, dtype=torch.float64))
    layer.tau.fill_(tau)
    return layer


def make_input(case: Case, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An input with a non-zero mean, so centred and uncentred variances differ."""
    gen = torch.Generator().manual_seed(seed + 1000)
    shape = (case.batch, case.in_channels, *case.size)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.3 + 0.4).to(dtype)


def assert_rel_close(actual: Tensor | None, expected: Tensor, name: str, tol: float = REL_TOL) -> None:
    """Asserts ``max|actual - expected| <= tol * max|expected|`` (exact equality when ``expected`` is 0)."""
    assert actual is not None, f"{name}: no gradient"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert diff <= tol * scale, f"{name}: max abs diff {diff:.3e} vs max abs value {scale:.3e}"


def run_and_compare(layer: ReCUConv2d, x: Tensor, seed: int) -> tuple[Tensor, RefStats]:
    """Runs the layer and the reference on the same data with a random upstream gradient; compares everything.

    Returns:
        The reference output and its statistics.
    """
    x_l = x.clone().requires_grad_()
    out = layer(x_l)
    x_r = x.clone().requires_grad_()
    w_r = layer.weight.detach().clone().requires_grad_()
    a_r = layer.alpha.detach().clone().requires_grad_()
    b_r = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    ref, stats = reference_conv(
        x_r,
        w_r,
        a_r,
        b_r,
        layer.tau.double(),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        padding_mode=layer.padding_mode,
        training=layer.training,
        binarize_weights=layer.binarize_weights,
    )
    if torch.isfinite(stats.q):  # a tie |W1| == Q would make the mask depend on rounding: keep data clear of it
        margin = ((stats.w1.abs() - stats.q).abs() / stats.q).min().item()
        assert margin > 1e-6, "test data too close to the threshold; change the seed"
    gen = torch.Generator().manual_seed(seed + 2000)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    out.backward(upstream)
    ref.backward(upstream.double())
    assert out.dtype == x.dtype
    assert_rel_close(out, ref, "output")
    assert_rel_close(x_l.grad, x_r.grad, "input grad")
    assert_rel_close(layer.weight.grad, w_r.grad, "weight grad")
    if layer.binarize_weights:
        assert_rel_close(layer.alpha.grad, a_r.grad, "alpha grad")
    if b_r is not None:
        assert_rel_close(layer.bias.grad, b_r.grad, "bias grad")
    return ref, stats


# ----------------------------------------------------------------------------------------------------------------
# 1. forward and every gradient against the float64 reference


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_matches_reference(case: Case, tau: float, training: bool) -> None:
    layer = make_layer(case, tau, seed=7)
    layer.train(training)
    _, stats = run_and_compare(layer, make_input(case, seed=7), seed=7)
    clipped = (stats.w1.abs() > stats.q).double().mean().item()
    if tau == 1.0:
        assert clipped == 0.0
    elif tau <= 0.85:  # the grid must exercise both sides of the ReCU mask
        assert 0.0 < clipped < 1.0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", PAD_MODE_CASES, ids=Case.id)
def test_matches_reference_padding_modes(case: Case, training: bool) -> None:
    """Non-zero padding modes: the variance is the input's own, padding is applied to the binary input."""
    layer = make_layer(case, 0.85, seed=11)
    layer.train(training)
    run_and_compare(layer, make_input(case, seed=11), seed=11)


@pytest.mark.parametrize("case", CASES + PAD_MODE_CASES, ids=Case.id)
def test_inference_counts_exactly_then_scales(case: Case) -> None:
    """Eval mode without autograd (``binarize eval``, validation): the +-1 products are summed exactly and
    ``alpha`` is applied once, so the float32 output is ``fl(fl(count * alpha) + bias)`` bitwise, as the
    packed kernel computes it; with autograd on, the training path gives the same values to rounding."""
    layer = make_layer(case, 0.85, seed=5, dtype=torch.float32).eval()
    x = make_input(case, seed=5, dtype=torch.float32)
    ones = torch.ones(case.out_channels, dtype=torch.float64)
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    counts, _ = reference_conv(
        x.double(), layer.weight.double(), ones, None, layer.tau.double(), padding_mode=case.padding_mode,
        training=False, binarize_weights=True, **conv,
    )  # fmt: skip
    assert torch.equal(counts, counts.round()) and counts.abs().max() > 1
    expected = counts.float() * layer.alpha.detach().view(1, -1, 1, 1)
    if layer.bias is not None:
        expected = expected + layer.bias.detach().view(1, -1, 1, 1)
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(out, expected)
    assert_rel_close(layer(x).detach(), expected, "output with autograd", tol=1e-5)


def test_reference_variance_path_matters() -> None:
    """Sanity check of the reference and the grid: detaching the activation variance changes the input gradient."""
    case = CASES[0]
    layer = make_layer(case, 0.85, seed=3)
    args = (layer.weight.detach(), layer.alpha.detach(), layer.bias.detach(), 0.85)
    x = make_input(case, seed=3).requires_grad_()
    ref, _ = reference_conv(x, *args, padding=1)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    (g_full,) = torch.autograd.grad(ref, x, upstream)
    rstd = torch.rsqrt(x.detach().var(dim=(1, 2, 3), keepdim=True) + 1e-5)
    ref_detached, _ = reference_conv(x * rstd, *args, padding=1, training=False)
    (g_detached,) = torch.autograd.grad(ref_detached, x, upstream)
    assert (g_full - g_detached).abs().max() > 1e-3 * g_full.abs().max()


def test_threshold_is_exact() -> None:
    """Place ``Q`` between two ``|W1|`` that differ by ~1e-5 relative: the layer's mask must split them the same way."""
    case = Case(8, 8, 3, (6, 6), padding=1)
    layer = make_layer(case, 0.85, seed=31)
    w1 = reference_conv(make_input(case, 31), layer.weight.detach(), layer.alpha.detach(), None, 1.0, padding=1)[1].w1
    b = w1.abs().mean().item()
    mags = w1.abs().flatten().sort().values
    lo_q, hi_q = -b * math.log(2 - 2 * 0.6), -b * math.log(2 - 2 * 0.99)
    rel_gap = (mags[1:] - mags[:-1]) / mags[1:]
    ok = (rel_gap > 1e-5) & (rel_gap < 1e-4) & (mags[:-1] > lo_q) & (mags[1:] < hi_q)
    assert ok.any(), "no suitable pair of weights; change the seed"
    i = int(torch.nonzero(ok)[0])
    target = (mags[i] + mags[i + 1]).item() / 2
    layer.tau.fill_(1 - math.exp(-target / b) / 2)
    _, stats = run_and_compare(layer, make_input(case, seed=31), seed=31)
    assert mags[i] <= stats.q < mags[i + 1]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_threshold_buffer_holds_q(training: bool) -> None:
    """The non-persistent ``threshold`` buffer receives the reference ``Q`` of the last forward."""
    case = Case(6, 8, 3, (5, 5), padding=1)
    layer = make_layer(case, 0.9, seed=5).train(training)
    assert "threshold" not in layer.state_dict() and "threshold" in dict(layer.named_buffers())
    layer.threshold.fill_(float("nan"))
    _, stats = run_and_compare(layer, make_input(case, seed=5), seed=5)
    assert layer.threshold.dtype == torch.float32 and layer.threshold.dim() == 0
    assert layer.threshold.item() == pytest.approx(stats.q.item(), rel=1e-6)
    layer.double()
    assert layer.threshold.dtype == torch.float32 and layer.threshold.item() == pytest.approx(stats.q.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 2. exact zeros: sign(0) = sign(-0.0) = +1


def _weights_with_centred_zeros(out_channels: int, n: int, gen: torch.Generator) -> Tensor:
    """Dyadic weights per channel ``m_o + v`` where ``v`` sums to 0 and contains exact zeros (and -0.0 when m=0)."""
    rows = []
    for o in range(out_channels):
        half = (n - 2) // 2
        u = torch.randint(-8, 9, (half,), generator=gen).double() / 8
        zeros = torch.tensor([0.0, -0.0] + [0.0] * (n - 2 - 2 * half), dtype=torch.float64)
        v = torch.cat([u, -u, zeros])[torch.randperm(n, generator=gen)]
        m = 0.0 if o % 2 == 0 else float(torch.randint(-4, 5, (1,), generator=gen)) / 4
        rows.append(v + m if m != 0.0 else v)  # keep -0.0 in zero-mean channels
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_exact_zeros(dtype: torch.dtype, training: bool) -> None:
    case = Case(4, 6, 3, (6, 7), padding=1)
    layer = make_layer(case, 0.85, seed=5)
    layer.train(training)
    gen = torch.Generator().manual_seed(5)
    w = _weights_with_centred_zeros(6, 36, gen).view(6, 4, 3, 3)
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    assert (centred == 0).sum() >= 12 and (torch.signbit(centred) & (centred == 0)).any()
    with torch.no_grad():
        layer.weight.copy_(w)
    x = make_input(case, seed=5)
    mask = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    x = torch.where(mask < 0.3, 0.0, x)
    x = torch.where(mask > 0.9, -0.0, x)
    layer = layer.to(dtype)
    x = x.to(dtype)

    expected_bw = sign_pm1(centred).to(dtype)
    bw = layer.binary_weight().detach() / layer.alpha.detach().view(-1, 1, 1, 1)
    assert not (bw == 0).any()
    wrong = (bw != expected_bw).sum().item()
    assert wrong == 0, f"{wrong} binary weights differ from sign(W - mean_o) with sign(0) = +1"
    assert torch.equal(layer.sign_bits(), centred >= 0)

    if dtype == torch.float64:
        run_and_compare(layer, x, seed=5)
    else:
        ref, _ = reference_conv(
            x.double(),
            w,
            layer.alpha.detach().double(),
            layer.bias.detach().double(),
            0.85,
            padding=1,
            training=training,
        )
        assert_rel_close(layer(x), ref, "output", tol=1e-6)


def _identity_probe(channels: int) -> ReCUConv2d:
    """A float-weight layer whose output is its binary input (identity 1x1 weights)."""
    layer = ReCUConv2d(channels, channels, 1, bias=False, binarize_weights=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return layer


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_binary_input_never_zero(training: bool) -> None:
    """With float identity 1x1 weights the output is the binary input itself: only ±1, zeros map to +1."""
    layer = _identity_probe(4)
    layer.train(training)
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.5, -2.5]).repeat(2, 4, 3, 1)
    x[1] += 0.25
    out = layer(x)
    assert torch.equal(out, sign_pm1(x))
    assert not (out == 0).any()


# ----------------------------------------------------------------------------------------------------------------
# 3. properties


_floats = st.floats(min_value=-8.0, max_value=8.0, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(
    out_channels=st.integers(1, 4),
    in_channels=st.integers(1, 3),
    kernel=st.sampled_from([1, 2, 3]),
    data=st.data(),
)
def test_property_binary_weight_and_sign_bits(
    out_channels: int, in_channels: int, kernel: int, data: st.DataObject
) -> None:
    n = in_channels * kernel * kernel
    if n == 1:
        in_channels, n = 2, 2 * kernel * kernel
    values = data.draw(st.lists(_floats, min_size=out_channels * n, max_size=out_channels * n))
    alpha = data.draw(st.lists(_floats.filter(lambda a: abs(a) > 1e-3), min_size=out_channels, max_size=out_channels))
    layer = ReCUConv2d(in_channels, out_channels, kernel, bias=False)
    w = torch.tensor(values, dtype=torch.float32).view(layer.weight.shape)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.alpha.copy_(torch.tensor(alpha))
    bw = layer.binary_weight().detach() / layer.alpha.detach().view(-1, 1, 1, 1)
    assert ((bw == 1) | (bw == -1)).all()
    bits = layer.sign_bits()
    assert bits.dtype == torch.bool and bits.shape == w.shape
    assert torch.equal(bits, (w - w.mean(dim=(1, 2, 3), keepdim=True)) >= 0)


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(_floats, min_size=2 * 3 * 4 * 5, max_size=2 * 3 * 4 * 5),
    training=st.booleans(),
)
def test_property_binary_activations(values: list[float], training: bool) -> None:
    x = torch.tensor(values).view(2, 3, 4, 5)
    out = _identity_probe(3).train(training)(x)
    assert ((out == 1) | (out == -1)).all()
    assert torch.equal(out, sign_pm1(x))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(4, 6, 3, 1), (3, 5, 2, 1), (8, 4, 3, 2), (16, 3, 1, 1), (6, 8, 3, 2)]),
    tau=st.sampled_from([0.55, 0.7, 0.85, 0.95, 0.99]),
    scale=st.sampled_from([1e-3, 0.05, 3.0]),
)
def test_property_weight_gradient_mask(seed: int, shape: tuple[int, int, int, int], tau: float, scale: float) -> None:
    """The weight gradient is ``(c/sigma)[g M - mean(g M) - W1 sum(g M W1)/((n-1)c^2)]`` with ``M = |W1| <= Q``.

    The input has the kernel's spatial size, so every entry of ``g`` (the gradient with respect to the binary
    weight) is non-zero; then entries the mask removes receive only the shared terms, which identifies the mask.
    """
    in_c, out_c, k, groups = shape
    gen = torch.Generator().manual_seed(seed)
    layer = ReCUConv2d(in_c, out_c, k, groups=groups, bias=False).double().eval()
    with torch.no_grad():
        offset = torch.randn((), generator=gen, dtype=torch.float64)
        layer.weight.copy_(_laplace(tuple(layer.weight.shape), gen) * scale + scale * offset)
        layer.alpha.uniform_(0.5, 1.5, generator=gen)
    layer.tau.fill_(tau)
    x = torch.randn(1, in_c, k, k, generator=gen, dtype=torch.float64)
    upstream = torch.rand(1, out_c, 1, 1, generator=gen, dtype=torch.float64) + 0.5
    layer(x).backward(upstream)

    w = layer.weight.detach()
    n = w[0].numel()
    w_ref = w.clone().requires_grad_()
    ref, stats = reference_conv(x, w_ref, layer.alpha.detach(), None, layer.tau.double(), groups=groups, training=False)
    ref.backward(upstream)
    y, q = stats.w1, stats.q
    if ((y.abs() - q).abs() < 1e-6 * q).any():
        return  # a tie with the threshold: the mask would depend on rounding
    mask = (y.abs() <= q).double()
    g = torch.nn.grad.conv2d_weight(
        stats.binary_input, w.shape, upstream * layer.alpha.detach().view(1, -1, 1, 1), groups=groups
    )
    assert (g != 0).all()
    gm = g * mask
    mean_gm = gm.mean(dim=(1, 2, 3), keepdim=True)
    k_term = (gm * y).sum(dim=(1, 2, 3), keepdim=True) / ((n - 1) * WEIGHT_SCALE**2)
    formula = WEIGHT_SCALE / stats.sigma * (gm - mean_gm - y * k_term)
    assert_rel_close(w_ref.grad, formula, "reference vs closed form")  # the reference itself
    assert_rel_close(layer.weight.grad, formula, "layer vs closed form")
    direct = layer.weight.grad * stats.sigma / WEIGHT_SCALE + mean_gm + y * k_term  # = g * M, recovered
    tol = 1e-8 * g.abs().max()
    inferred_mask = direct.abs() > g.abs() / 2
    assert torch.equal(inferred_mask, mask.bool())
    assert (direct[~inferred_mask].abs() <= tol).all() and ((direct - g)[inferred_mask].abs() <= tol).all()


# ----------------------------------------------------------------------------------------------------------------
# 4. no host synchronisation


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that read a device value back to the host (and every op, by name)."""

    SYNC_OPS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.item.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.masked_select.default,
    }

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] = self.ops.get(name, 0) + 1
        if func in self.SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_sync_counter_detects_syncs() -> None:
    t = torch.randn(3)
    with SyncCounter() as counter:
        t.sum().item()
    assert len(counter.syncs) == 1
    with SyncCounter() as counter:
        if t.abs().sum() > 0:
            pass
        t.nonzero()
    assert len(counter.syncs) >= 2


def test_no_host_sync_in_training_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        ReCUConv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardtanh(),
        ReCUConv2d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(16),
        ReCUConv2d(16, 16, 1, binarize_weights=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for step in range(2):  # the second step also exercises the momentum buffers
        with SyncCounter() as counter:
            for m in model.modules():
                if isinstance(m, ReCUConv2d):
                    m.tau.fill_(0.85 + 0.05 * step)
            loss = F.cross_entropy(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        assert counter.syncs == [], f"host syncs: {counter.syncs}"
        assert counter.ops.get("aten.convolution_backward", 0) >= 4, "backward not observed by the counter"


# ----------------------------------------------------------------------------------------------------------------
# 5. bf16 autocast and low-precision statistics


def test_bf16_autocast() -> None:
    case = Case(8, 8, 3, (6, 7), padding=1, groups=1)
    layer = make_layer(case, 0.85, seed=9, dtype=torch.float32)
    x = make_input(case, seed=9, dtype=torch.float32).requires_grad_()
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().backward(torch.randn(out.shape))
    assert layer.weight.grad.dtype == torch.float32 and layer.alpha.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32
    for t in (x.grad, layer.weight.grad, layer.alpha.grad, layer.bias.grad):
        assert torch.isfinite(t).all() and t.abs().sum() > 0
    assert_rel_close(out, ref.detach(), "bf16 output", tol=2e-2)

    with torch.no_grad():  # alpha = 1, no bias: the output is an integer <= 72, exact in bf16
        layer.alpha.fill_(1.0)
        layer.bias.zero_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert torch.equal(out.float(), layer(x))


@pytest.mark.parametrize(("dtype", "step"), [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_low_precision_layer_uses_float32_statistics(dtype: torch.dtype, step: float) -> None:
    """Centring in float32: ``mean(1, 1, 1, 1 + step) = 1 + step/4`` rounds to 1 in bf16/fp16 arithmetic."""
    layer = ReCUConv2d(1, 1, (1, 4), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0 + step]).view(1, 1, 1, 4))
    layer = layer.to(dtype)
    assert layer.weight[0, 0, 0, 3].item() == 1.0 + step
    expected = torch.tensor([-1.0, -1.0, -1.0, 1.0]).view(1, 1, 1, 4)
    bw = layer.binary_weight().detach().float() / layer.alpha.detach().float()
    assert torch.equal(bw, expected)
    assert torch.equal(layer.sign_bits(), expected > 0)


def test_float64_statistics_stay_float64() -> None:
    """Centring in float64: 1 + 2^-40 is distinct from 1 only in float64."""
    layer = ReCUConv2d(1, 1, (1, 2), bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 1.0 + 2**-40], dtype=torch.float64).view(1, 1, 1, 2))
    expected = torch.tensor([-1.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2)
    assert torch.equal(layer.binary_weight().detach() / layer.alpha.detach(), expected)
    assert torch.equal(layer.sign_bits(), expected > 0)


# ----------------------------------------------------------------------------------------------------------------
# 6. channels_last


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=Case.id)
def test_channels_last(case: Case, training: bool) -> None:
    layer = make_layer(case, 0.85, seed=13).train(training)
    layer_cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    x = make_input(case, seed=13).requires_grad_()
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn(layer(x).shape, dtype=torch.float64)
    out, out_cl = layer(x), layer_cl(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    out.backward(upstream)
    out_cl.backward(upstream.to(memory_format=torch.channels_last))
    assert_rel_close(out_cl, out, "output", tol=1e-12)
    assert_rel_close(x_cl.grad, x.grad, "input grad", tol=1e-12)
    for name in ("weight", "alpha", "bias"):
        p, p_cl = getattr(layer, name), getattr(layer_cl, name)
        if p is not None:
            assert_rel_close(p_cl.grad, p.grad, f"{name} grad", tol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 7. torch.compile


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        ReCUConv2d(4, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardtanh(),
        ReCUConv2d(8, 8, 3, padding=1, groups=2),
    ).double()  # float64: BatchNorm makes the first alpha gradient a cancellation, too noisy to compare in float32
    compiled = copy.deepcopy(model)
    compiled_fn = torch.compile(compiled, fullgraph=True)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    upstream = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    x_e, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = model(x_e), compiled_fn(x_c)
    out_e.backward(upstream)
    out_c.backward(upstream)
    assert_rel_close(out_c, out_e, "output", tol=1e-9)
    assert_rel_close(x_c.grad, x_e.grad, "input grad", tol=1e-9)
    for (name, p_e), p_c in zip(model.named_parameters(), compiled.parameters(), strict=True):
        assert_rel_close(p_c.grad, p_e.grad, f"{name} grad", tol=1e-9)
    for i in (0, 3):
        assert compiled[i].threshold.isfinite()
        assert compiled[i].threshold.item() == pytest.approx(model[i].threshold.item(), rel=1e-6)

    # tau is read from the buffer at run time, not baked into the compiled graph
    grad_before = model[0].weight.grad.clone()
    for m in (model[0], model[3], compiled[0], compiled[3]):
        m.tau.fill_(0.6)
    grads = []
    for fn, module in ((model, model), (compiled_fn, compiled)):
        module.zero_grad()
        fn(x).backward(upstream)
        grads.append(module[0].weight.grad.clone())
    assert_rel_close(grads[1], grads[0], "weight grad after tau update", tol=1e-9)
    assert (grads[0] - grad_before).abs().max() > 1e-3 * grad_before.abs().max()


# ----------------------------------------------------------------------------------------------------------------
# 8. the tau buffer


def test_tau_buffer_state_dict_and_dtype() -> None:
    layer = ReCUConv2d(4, 6, 3)
    state = layer.state_dict()
    assert "tau" in state and "tau" in dict(layer.named_buffers())
    assert state["tau"].dim() == 0 and state["tau"].dtype == torch.float32
    tau = layer.tau
    layer.tau.fill_(0.93)
    assert layer.tau is tau and layer.tau.item() == pytest.approx(0.93)
    layer.double()
    assert layer.tau.dtype == torch.float32 and layer.tau.dim() == 0 and layer.weight.dtype == torch.float64
    assert layer.tau.item() == torch.tensor(0.93).item()


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_tau_survives_low_precision_cast(cast: str) -> None:
    """Casting the module keeps tau float32 and keeps its value (a detour through fp16/bf16 would move Q)."""
    layer = ReCUConv2d(4, 6, 3)
    layer.tau.fill_(0.99)
    before = layer.tau.clone()
    getattr(layer, cast)()
    assert layer.tau.dtype == torch.float32 and layer.tau.dim() == 0
    assert torch.equal(layer.tau, before), f"tau changed from {before.item()!r} to {layer.tau.item()!r}"


def test_tau_changes_mask_not_forward() -> None:
    case = CASES[0]
    layer = make_layer(case, 1.0, seed=17)
    x = make_input(case, seed=17)
    out_1, _ = run_and_compare(layer, x, seed=17)
    grad_1 = layer.weight.grad.clone()
    layer.zero_grad()
    layer.tau.fill_(0.6)
    out_06, _ = run_and_compare(layer, x, seed=17)
    assert torch.equal(out_1, out_06)
    assert torch.equal(layer(x), layer.eval()(x).detach())  # the activation scaling does not change the forward
    assert (layer.weight.grad - grad_1).abs().max() > 1e-3 * grad_1.abs().max()


def test_tau_state_dict_round_trip() -> None:
    src = make_layer(CASES[0], 0.9, seed=19)
    dst = make_layer(CASES[0], 1.0, seed=20)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.tau, src.tau) and dst.tau.dtype == torch.float32 and dst.tau.dim() == 0
    for name, p in src.named_parameters():
        assert torch.equal(getattr(dst, name), p)
    x = make_input(CASES[0], seed=19)
    assert torch.equal(dst(x), src(x))


# ----------------------------------------------------------------------------------------------------------------
# 9. weights kept float


@pytest.mark.parametrize("toggle", ["kwarg", "attribute"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=Case.id)
def test_float_weights(case: Case, training: bool, toggle: str) -> None:
    if toggle == "kwarg":
        layer = make_layer(case, 0.85, seed=23, binarize_weights=False)
    else:
        layer = make_layer(case, 0.85, seed=23)
        layer.binarize_weights = False
    layer.train(training)
    x = make_input(case, seed=23)
    ref, stats = run_and_compare(layer, x, seed=23)
    plain = F.conv2d(
        stats.binary_input,
        layer.weight.detach(),
        layer.bias.detach(),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
    )
    assert_rel_close(ref, plain, "reference")
    assert layer.alpha.grad is None or not layer.alpha.grad.any()
    assert torch.equal(layer.binary_weight(), layer.weight)


# ----------------------------------------------------------------------------------------------------------------
# 10. from_float


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_from_float(padding_mode: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=True, padding_mode=padding_mode)
    before = copy.deepcopy(conv.state_dict())
    layer = ReCUConv2d.from_float(conv)
    assert type(layer) is ReCUConv2d and "ReCUConv2d" in repr(layer)
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert layer.weight.dtype == conv.weight.dtype
    assert layer.weight.is_contiguous(memory_format=torch.channels_last) and not layer.weight.is_contiguous()
    assert layer.state_dict()["weight"].is_contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach()
    expected_alpha = (w - w.mean(dim=(1, 2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
    assert_rel_close(layer.alpha, expected_alpha, "alpha", tol=1e-6)
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.add_(1.0)
    for key, value in conv.state_dict().items():
        assert torch.equal(value, before[key]), f"conv.{key} changed"
    assert conv.weight.requires_grad and type(conv) is nn.Conv2d


def test_from_float_alpha_float64() -> None:
    conv = nn.Conv2d(3, 4, 3).double()
    a, b = ReCUConv2d.from_float(conv), ReCUConv2d.from_float(conv)
    assert torch.equal(a.alpha, b.alpha) and a.alpha.dtype == torch.float64
    w = conv.weight.detach()
    expected = (w - w.mean(dim=(1, 2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
    assert_rel_close(a.alpha, expected, "alpha", tol=1e-12)


def test_from_float_matches_reference() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, dilation=2, groups=2).double()
    layer = ReCUConv2d.from_float(conv)
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    run_and_compare(layer, x, seed=29)


# ----------------------------------------------------------------------------------------------------------------
# 11. learnable activation bias (a learnable threshold before the sign)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_activation_bias_is_a_shift_of_the_input(training: bool) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    with_bias = ReCUConv2d.from_float(conv, options=LayerOptions(activation_bias=True)).train(training)
    plain = ReCUConv2d.from_float(conv).train(training)
    assert with_bias.activation_bias.shape == (4,) and not with_bias.activation_bias.any()
    assert plain.activation_bias is None and "learn_activation_bias" in repr(with_bias)
    beta = torch.tensor([0.3, -0.2, 0.0, 1.1], dtype=torch.float64)
    with torch.no_grad():
        with_bias.activation_bias.copy_(beta)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    shifted = (x.detach() + beta.view(1, -1, 1, 1)).requires_grad_()
    grad_out = torch.randn(3, 6, 6, 5, dtype=torch.float64)
    out = with_bias(x)
    out.backward(grad_out)
    expected = plain(shifted)
    expected.backward(grad_out)
    assert torch.equal(out, expected)
    assert torch.allclose(x.grad, shifted.grad, rtol=1e-12, atol=0)
    assert torch.allclose(with_bias.activation_bias.grad, shifted.grad.sum(dim=(0, 2, 3)), rtol=1e-12, atol=1e-15)
    assert torch.allclose(with_bias.weight.grad, plain.weight.grad, rtol=1e-12, atol=0)
    # the threshold moves: an input of exactly -beta is now a zero, which binarizes to +1
    assert not torch.equal(
        with_bias(torch.zeros(1, 4, 6, 5, dtype=torch.float64)), plain(torch.zeros(1, 4, 6, 5).double())
    )


def test_activation_bias_survives_state_dict_and_casts() -> None:
    layer = ReCUConv2d.from_float(nn.Conv2d(3, 4, 3), options=LayerOptions(activation_bias=True))
    with torch.no_grad():
        layer.activation_bias.fill_(0.25)
    copy_ = ReCUConv2d.from_float(nn.Conv2d(3, 4, 3), options=LayerOptions(activation_bias=True))
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_.activation_bias, layer.activation_bias)
    assert layer.bfloat16().activation_bias.dtype == torch.bfloat16
