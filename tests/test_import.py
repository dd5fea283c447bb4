"""``import binarize`` is lean: in a fresh interpreter it imports neither timm nor its model files, nor rich or
matplotlib (display libraries that the command line, the progress display and the plots import when they need
them), does not initialise CUDA, and prints nothing."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

_PROBE = r"""
import json, sys
import torch

lazy_inits = []
original = torch.cuda._lazy_init
torch.cuda._lazy_init = lambda *a, **k: (lazy_inits.append(1), original(*a, **k))[1]
torch.cuda.init = torch.cuda._lazy_init

import binarize

names = list(binarize.__all__)
print(json.dumps({
    "timm": sorted(m for m in sys.modules if m == "timm" or m.startswith("timm.")),
    "display": sorted(m for m in sys.modules if m.split(".")[0] in ("rich", "matplotlib")),
    "cuda_initialized": torch.cuda.is_initialized(),
    "cuda_init_calls": len(lazy_inits),
    "missing_names": [n for n in names if not hasattr(binarize, n)],
}))
"""


@functools.cache
def _probe() -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"import binarize printed: {lines[:-1]}"  # only the probe's own line
    return json.loads(lines[0])


def test_import_is_lean_and_silent():
    found = {k: v for k, v in _probe().items() if k != "display"}
    assert found == {"timm": [], "cuda_initialized": False, "cuda_init_calls": 0, "missing_names": []}


def test_import_loads_no_display_library():
    """Neither rich nor matplotlib: a library import must not pull in the command line's or the plots' libraries."""
    assert _probe()["display"][:5] == []
