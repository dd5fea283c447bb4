"""The native binary-convolution kernel (``bconv.c``), its dispatch, and the exact pure-torch fallback.

The shared library ``binarize/runtime/_bconv*.so`` is built by ``pip install`` (``setup.py``; optional: an
install without a C compiler succeeds without it). It is loaded with :mod:`ctypes`, which releases the
GIL during a call, on first use, not at import. Its kernels:

==============  ==================================================================
``vpopcntdq``   AVX-512F + AVX512_VPOPCNTDQ, 512-bit XOR and ``vpopcntq``
``avx512bw``    AVX-512BW, 512-bit XOR and a nibble-lookup (``vpshufb``) popcount
``avx2``        AVX2, 256-bit XOR and a nibble-lookup popcount
``scalar``      64-bit words and ``popcnt`` (portable C elsewhere)
``torch``       no native code: unpacked +-1 weights and ``F.conv2d`` (any device)
==============  ==================================================================

Inputs of at most 64 channels (kernels of at most 31 taps) run a direct kernel instead of im2col + GEMM,
vectorised over output channels; the three x86 vector kernels share its AVX2 code (``bconv.c`` explains
both schemes and the zero-padding correction).

Selection, once per process on first use: the environment variable ``BINARIZE_KERNEL``
(``auto|vpopcntdq|avx512bw|avx2|scalar|torch``; ``auto`` when unset) is read then and only then (a
documented exception to binarize reading no environment). ``auto`` takes the first native kernel in the
order above that the CPU supports and that passes a known-answer self-test (five small odd-shaped
convolutions on 1 and 2 threads, compared bitwise with the scalar kernel and the pure-torch result); a
kernel that fails is reported in ``kernel_info()["rejected"]`` with a one-line warning and the next one is
tried. Without the shared library ``auto`` falls back to ``torch`` with a one-line warning that says how to build it.

Every kernel gives bitwise the same float32 output: the accumulation is integer, the output transform
``(float)acc * mul + add`` is two float32 roundings in every path.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from binarize.errors import ConfigError
from binarize.runtime.packing import pack_signs, packed_bytes, unpack_signs

__all__ = ["ENV_VAR", "KERNELS", "KernelWarning", "conv2d", "kernel_info", "output_size"]

ENV_VAR = "BINARIZE_KERNEL"
"""Environment variable read once, on first use, to choose the kernel."""

NATIVE_KERNELS = ("vpopcntdq", "avx512bw", "avx2", "scalar")
"""The native kernels, in the order ``auto`` tries them."""

KERNELS = (*NATIVE_KERNELS, "torch")
"""Every kernel name ``BINARIZE_KERNEL`` accepts, besides ``auto``."""

ABI_VERSION = 1
"""``BCONV_ABI_VERSION`` of the bconv.c this wrapper was written for; another build is not used."""

_SOURCE = Path(__file__).resolve().with_name("bconv.c")
_PATH_ID = {"scalar": 0, "avx2": 1, "avx512bw": 2, "vpopcntdq": 3}
_ERRORS = {-1: "invalid arguments", -2: "out of memory", -3: "kernel not supported by this CPU", -4: "bad weights"}
_BUILD_HINT = "build it with a C compiler: pip install -e . (or pip install .) in the binarize source tree"


class KernelWarning(RuntimeWarning):
    """The native kernel is missing or one of its variants failed its self-test."""


class _Library:
    """The loaded shared library with its function signatures."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        i, p, i64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64
        lib.bconv_abi_version.restype = i
        lib.bconv_abi_version.argtypes = []
        self.abi = lib.bconv_abi_version()
        if self.abi != ABI_VERSION:  # a stale in-place build: do not touch its other symbols
            return
        self.source_sha256 = ""  # unknown: built by hand, not by setup.py
        if hasattr(lib, "bconv_source_sha256"):
            lib.bconv_source_sha256.restype = ctypes.c_char_p
            lib.bconv_source_sha256.argtypes = []
            self.source_sha256 = lib.bconv_source_sha256().decode()
        for name in ("bconv_cpu_paths", "bconv_compiled_paths", "bconv_emulated"):
            getattr(lib, name).restype = i
            getattr(lib, name).argtypes = []
        lib.bconv_prepared_size.restype = i64
        lib.bconv_prepared_size.argtypes = [i] * 5
        lib.bconv_prepare.restype = i
        lib.bconv_prepare.argtypes = [i, p, i, i, i, i, p, i64]
        lib.bconv_conv2d.restype = i
        # no argtypes: ctypes converts plain ints several times faster without them (pointers are wrapped)
        self.conv2d = lib.bconv_conv2d
        self.lib = lib
        self.path = path
        self.cpu_paths = lib.bconv_cpu_paths()
        self.emulated = bool(lib.bconv_emulated())

    def supports(self, name: str) -> bool:
        return bool(self.cpu_paths >> _PATH_ID[name] & 1)


class _State:
    """Everything decided once per process (reset only by tests)."""

    def __init__(self) -> None:
        self.loaded = False
        self.library: _Library | None = None
        self.missing: str | None = None  # why there is no usable library
        self.requested: str | None = None
        self.active: str | None = None
        self.error: ConfigError | None = None
        self.self_tests: dict[str, str | None] = {}  # kernel -> None (passed) or why it failed
        self.checked: set[str] = set()  # native kernels found usable for an explicit ``kernel=``


_lock = threading.RLock()
_state = _State()
# id(weight_bits) -> (weak reference, {key: (weight_bits._version, derived tensor)}): the weights repacked for a
# kernel or unpacked to +-1, kept while the tensor lives and used while it is unchanged
_derived: dict[int, tuple[weakref.ref, dict]] = {}


def _find_library() -> Path | None:
    """The built extension beside this file, or None."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bconv{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _reset() -> None:
    """Forgets every decision, so the next use loads and selects again (for tests)."""
    global _state
    with _lock:
        _state = _State()
        _derived.clear()


def _library() -> _Library | None:
    with _lock:
        if not _state.loaded:
            _state.loaded = True
            path = _find_library()
            if path is None:
                _state.missing = "the native kernel is not built"
            else:
                try:
                    library = _Library(path)
                except OSError as err:
                    _state.missing = f"the native kernel {path.name} cannot be loaded ({err})"
                else:
                    stale = _staleness(library)
                    if stale is not None:
                        _state.missing = f"the native kernel {path.name} is a stale build ({stale})"
                    else:
                        _state.library = library
        return _state.library


def _staleness(library: _Library) -> str | None:
    """Why ``library`` was not built from the ``bconv.c`` beside this file, or None when it was."""
    if library.abi != ABI_VERSION:
        return f"ABI {library.abi}, expected {ABI_VERSION}"
    if library.source_sha256 and _SOURCE.is_file():
        if hashlib.sha256(_SOURCE.read_bytes()).hexdigest() != library.source_sha256:
            return "bconv.c changed since it was built"
    return None


def _supported() -> list[str]:
    library = _library()
    return [] if library is None else [name for name in NATIVE_KERNELS if library.supports(name)]


def active_kernel() -> str:
    """The kernel chosen for this process (selecting it on the first call).

    Raises:
        ConfigError: ``BINARIZE_KERNEL`` names no kernel, or one that this machine cannot run.
    """
    active = _state.active
    if active is not None:
        return active
    with _lock:
        if _state.active is not None:
            return _state.active
        if _state.error is not None:
            raise _state.error
        requested = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        _state.requested = requested
        try:
            _state.active = _choose(requested)
        except ConfigError as err:
            _state.error = err
            raise
        return _state.active


def _choose(requested: str) -> str:
    if requested not in ("auto", *KERNELS):
        raise ConfigError(f"{ENV_VAR}={requested!r} is not a kernel; use one of: auto, {', '.join(KERNELS)}")
    if requested == "torch":
        return "torch"
    library = _library()
    if requested != "auto":
        if library is None:
            raise ConfigError(f"{ENV_VAR}={requested}: {_state.missing}; {_BUILD_HINT}, or set {ENV_VAR}=torch")
        if not library.supports(requested):
            available = ", ".join([*_supported(), "torch"])
            raise ConfigError(f"{ENV_VAR}={requested} is not available on this machine; available: {available}")
        failure = _self_test(requested)
        if failure is not None:
            raise ConfigError(f"{ENV_VAR}={requested} failed its self-test ({failure}); set {ENV_VAR}=auto")
        return requested
    if library is None:
        warnings.warn(
            f"binarize: {_state.missing}, so packed binary convolutions use the slow pure-torch fallback; "
            f"{_BUILD_HINT}",
            KernelWarning,
            stacklevel=4,
        )
        return "torch"
    for name in _supported():
        if _self_test(name) is None:
            return name
    return "torch"


def _self_test(name: str) -> str | None:
    """Runs the known-answer test of one native kernel once per process; None when it passes."""
    with _lock:
        if name in _state.self_tests:
            return _state.self_tests[name]
        _state.self_tests[name] = failure = _known_answer_failure(name)
        if failure is not None:
            warnings.warn(
                f"binarize: the {name} kernel failed its self-test and is not used: {failure}",
                KernelWarning,
                stacklevel=5,
            )
        return failure


# (batch, in channels, height, width, out channels, kernel, stride, padding, dilation, activation bias)
_SELF_TEST_CASES = (
    (2, 33, 7, 5, 5, 3, 2, 1, 1, True),
    (1, 70, 6, 9, 9, 3, 1, 2, 2, False),
    (3, 3, 5, 4, 6, 1, 1, 0, 1, True),
    (1, 129, 4, 4, 17, 5, 1, 2, 1, False),
    (1, 2100, 3, 2, 3, 3, 1, 1, 1, True),  # more vectors than a byte of popcounts can sum
)


def _known_answer_failure(name: str) -> str | None:
    generator = torch.Generator().manual_seed(20210815)
    for case in _SELF_TEST_CASES:
        n, c, h, w, o, k, stride, padding, dilation, with_bias = case
        x = torch.randn(n, c, h, w, generator=generator)
        x.view(-1)[::7] = 0.0
        x.view(-1)[3::11] = -0.0
        signs = torch.rand(o, c, k, k, generator=generator) < 0.5
        bits = pack_signs(signs)
        mul = torch.randn(o, generator=generator)
        add = torch.randn(o, generator=generator)
        beta = torch.randn(c, generator=generator) if with_bias else None
        args = (x, bits, mul, add, beta, (stride, stride), (padding, padding), (dilation, dilation))
        expected = _torch_conv(*args, groups=1)
        references = [("the pure-torch result", expected)]
        if name != "scalar" and _library() is not None and _library().supports("scalar"):
            references.append(("the scalar kernel", _native_conv("scalar", *args, threads=1)))
        for threads in (1, 2):
            try:
                got = _native_conv(name, *args, threads=threads)
            except RuntimeError as err:
                return str(err)
            for what, reference in references:
                if not _bitwise_equal(got, reference):
                    return f"a {k}x{k} conv of {c}->{o} channels on {threads} thread(s) differs from {what}"
    return None


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def kernel_info() -> dict:
    """What the packed binary convolution runs on in this process.

    Returns:
        A dict with ``active`` (the kernel used), ``requested`` (the value of ``BINARIZE_KERNEL``,
        ``auto`` when unset), ``available`` (kernels this machine can use, fastest first, ``torch`` last),
        ``compiled`` (whether the native extension is built and loadable), ``rejected`` (kernel name ->
        why its self-test failed), ``threads`` (``torch.get_num_threads()``, what a call uses),
        ``library`` (the shared library's path or None) and ``reason`` (why it is missing, or None).

    Raises:
        ConfigError: ``BINARIZE_KERNEL`` is invalid or names a kernel this machine cannot use.
    """
    active = active_kernel()
    for name in _supported():
        _self_test(name)
    with _lock:
        library = _state.library
        rejected = {name: why for name, why in _state.self_tests.items() if why is not None}
        return {
            "active": active,
            "requested": _state.requested,
            "available": [name for name in _supported() if name not in rejected] + ["torch"],
            "compiled": library is not None,
            "rejected": rejected,
            "threads": torch.get_num_threads(),
            "library": None if library is None else str(library.path),
            "reason": _state.missing,
        }


def output_size(
    size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, int]:
    """The spatial size of a convolution's output (``nn.Conv2d``'s formula, zero padding)."""
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(size, kernel_size, stride, padding, dilation, strict=True)
    )


def _empty_output(x: Tensor, out_channels: int, oh: int, ow: int) -> Tensor:
    """A float32 ``[N, O, oh, ow]`` tensor over NHWC storage (what every kernel returns)."""
    n = x.shape[0]
    return torch.empty_strided(
        (n, out_channels, oh, ow),
        (oh * ow * out_channels, 1, ow * out_channels, out_channels),
        dtype=torch.float32,
        device=x.device,
    )


def conv2d(
    x: Tensor,
    weight_bits: Tensor,
    mul: Tensor,
    add: Tensor,
    activation_bias: Tensor | None = None,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    kernel: str | None = None,
) -> Tensor:
    """The packed binary convolution: ``(float)conv(sign(x + beta), W) * mul + add`` with zero padding.

    ``sign`` maps 0, -0.0 and NaN to +1; a tap in the zero padding contributes 0. See
    :class:`binarize.nn.PackedBinaryConv2d` for the layer around it.

    Args:
        x: Input ``[N, C, H, W]``, any memory format; computed in float32 (another dtype is binarized in
            its own dtype first).
        weight_bits: ``uint8`` ``[O, kh, kw, Cbytes]`` (layout in :mod:`binarize.runtime.packing`).
        mul: float32 ``[O]``.
        add: float32 ``[O]``.
        activation_bias: Optional ``[C]``, added to ``x`` before the sign.
        stride: Pair of ints.
        padding: Pair of ints: zero padding of each side.
        dilation: Pair of ints.
        groups: Groups; more than 1 runs the pure-torch kernel.
        kernel: A kernel name (``kernel_info()["available"]``) to use instead of the active one.

    Returns:
        float32 ``[N, O, OH, OW]`` in the channels-last memory format.
    """
    if x.dim() != 4 or weight_bits.dim() != 4 or weight_bits.dtype != torch.uint8:
        raise ValueError(
            f"expected an input [N, C, H, W] and uint8 weight_bits [O, kh, kw, Cbytes], got {tuple(x.shape)} and "
            f"{weight_bits.dtype} {tuple(weight_bits.shape)}"
        )
    n, c, h, w = x.shape
    o, kh, kw, cbytes = weight_bits.shape
    if c % groups or o % groups or cbytes != packed_bytes(c // groups):
        raise ValueError(
            f"input with {c} channels and groups={groups} does not fit weight_bits of shape {tuple(weight_bits.shape)}"
        )
    if activation_bias is not None and activation_bias.shape != (c,):
        raise ValueError(f"activation_bias has shape {tuple(activation_bias.shape)}, expected ({c},)")
    if x.dtype != torch.float32:
        xb = x if activation_bias is None else x + activation_bias.to(x.dtype).view(1, -1, 1, 1)
        x, activation_bias = _signs(xb), None
    name = kernel if kernel is not None else active_kernel()
    if kernel is not None and kernel != "torch" and kernel not in _state.checked:
        _check_usable(kernel)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input of size {h}x{w} is smaller than the {kh}x{kw} kernel (dilation {tuple(dilation)})")
    if groups != 1 or name == "torch" or x.device.type != "cpu" or n * oh * ow * o == 0:
        return _torch_conv(x, weight_bits, mul, add, activation_bias, stride, padding, dilation, groups=groups)
    return _native_conv(name, x, weight_bits, mul, add, activation_bias, stride, padding, dilation)


def _check_usable(name: str) -> None:
    if name not in KERNELS:
        raise ConfigError(f"kernel {name!r} is not a kernel; use one of: {', '.join(KERNELS)}")
    library = _library()
    if library is None:
        raise ConfigError(f"kernel {name}: {_state.missing}; {_BUILD_HINT}")
    if not library.supports(name):
        raise ConfigError(f"kernel {name} is not available on this machine; available: {', '.join(_supported())}")
    failure = _self_test(name)
    if failure is not None:
        raise ConfigError(f"kernel {name} failed its self-test: {failure}")
    _state.checked.add(name)


def _torch_conv(
    x: Tensor,
    weight_bits: Tensor,
    mul: Tensor,
    add: Tensor,
    activation_bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """The pure-torch kernel: ``F.conv2d`` of +-1 floats, exact, then the same output transform."""
    xb = x if activation_bias is None else x + activation_bias.to(x.dtype).view(1, -1, 1, 1)
    signs = _signs(xb)
    weight = _unpacked_weights(weight_bits, x.shape[1] // groups, x.device)
    # The sums are integers below 2**24, exact in float32 whatever the order; rounding also undoes the
    # error of a convolution algorithm that is not exact (Winograd, FFT), which stays far below 0.5.
    acc = F.conv2d(signs, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups).round_()
    # two float32 roundings, as (float)acc * mul + add in C (add's alpha = 1 adds exactly once)
    z = acc.mul_(mul.to(acc.device).view(1, -1, 1, 1)).add_(add.to(acc.device).view(1, -1, 1, 1))
    out = _empty_output(x, weight_bits.shape[0], z.shape[2], z.shape[3])
    return out.copy_(z)


def _signs(x: Tensor) -> Tensor:
    """float32 +-1: -1 where ``x < 0``, so 0, -0.0 and NaN give +1 (as the native packing)."""
    one = torch.ones((), dtype=torch.float32, device=x.device)
    return torch.where(x < 0, -one, one)


def _derived_cache(weight_bits: Tensor) -> dict:
    """The cache of tensors derived from ``weight_bits``, dropped when the tensor is."""
    key = id(weight_bits)
    entry = _derived.get(key)
    if entry is not None and entry[0]() is weight_bits:
        return entry[1]

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _derived.get(key, (None,))[0] is ref:
            del _derived[key]

    cache: dict = {}
    _derived[key] = (weakref.ref(weight_bits, forget), cache)
    return cache


def _cached(weight_bits: Tensor, key: tuple, build) -> Tensor:
    """``build()``, cached per ``weight_bits`` tensor until it changes (its version counter). Inference
    tensors (made under ``torch.inference_mode``) have no version counter: theirs is built every call."""
    if weight_bits.is_inference():
        return build()
    cache = _derived_cache(weight_bits)
    hit = cache.get(key)
    if hit is not None and hit[0] == weight_bits._version:
        return hit[1]
    value = build()
    cache[key] = (weight_bits._version, value)
    return value


def _unpacked_weights(weight_bits: Tensor, in_channels: int, device: torch.device) -> Tensor:
    key = ("unpacked", in_channels, str(device))
    return _cached(weight_bits, key, lambda: unpack_signs(weight_bits, in_channels).to(device))


def _prepared_weights(library: _Library, name: str, weight_bits: Tensor, in_channels: int) -> Tensor:
    """The weights repacked for one native kernel (``bconv_prepare``), cached until ``weight_bits`` changes."""
    return _cached(weight_bits, (name, in_channels), lambda: _prepare(library, name, weight_bits, in_channels))


def _prepare(library: _Library, name: str, weight_bits: Tensor, in_channels: int) -> Tensor:
    o, kh, kw, _ = weight_bits.shape
    path = _PATH_ID[name]
    size = library.lib.bconv_prepared_size(path, o, kh, kw, in_channels)
    if size < 0:
        raise ValueError(f"the native kernel cannot take a {kh}x{kw} conv of {in_channels}->{o} channels")
    bits = weight_bits.detach().to("cpu").contiguous()
    prepared = torch.empty(size, dtype=torch.uint8)
    rc = library.lib.bconv_prepare(path, bits.data_ptr(), o, kh, kw, in_channels, prepared.data_ptr(), size)
    if rc != 0:
        raise RuntimeError(f"bconv_prepare failed: {_ERRORS.get(rc, rc)}")
    return prepared


def _float32(t: Tensor) -> Tensor:
    """``t`` as a contiguous float32 CPU tensor (itself when it is one)."""
    if t.dtype == torch.float32 and t.is_contiguous() and t.is_cpu:
        return t
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _native_conv(
    name: str,
    x: Tensor,
    weight_bits: Tensor,
    mul: Tensor,
    add: Tensor,
    activation_bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    threads: int | None = None,
) -> Tensor:
    """One call of the native kernel ``name`` (float32 CPU ``x``, shapes already checked)."""
    library = _state.library or _library()
    if library is None:
        raise RuntimeError(_state.missing)
    n, c, h, w = x.shape
    o, kh, kw, _ = weight_bits.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    prepared = _prepared_weights(library, name, weight_bits, c)
    if not x.is_contiguous(memory_format=torch.channels_last):  # the kernel reads NHWC
        x = x.contiguous(memory_format=torch.channels_last)
    mul, add = _float32(mul), _float32(add)
    beta = None if activation_bias is None else _float32(activation_bias)  # referenced until the call returns
    out = torch.empty_strided((n, o, oh, ow), (oh * ow * o, 1, ow * o, o), dtype=torch.float32)
    rc = library.conv2d(
        ctypes.c_void_p(prepared.data_ptr()),
        torch.get_num_threads() if threads is None else threads,
        ctypes.c_void_p(x.data_ptr()),
        None if beta is None else ctypes.c_void_p(beta.data_ptr()),
        n,
        h,
        w,
        c,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        ctypes.c_void_p(mul.data_ptr()),
        ctypes.c_void_p(add.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
    )
    if rc != 0:
        raise RuntimeError(f"the {name} binary convolution kernel failed: {_ERRORS.get(rc, rc)}")
    return out
