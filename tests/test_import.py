"""``import binarize`` is lean: in a fresh interpreter it imports neither timm nor its model files, does not
initialise CUDA, and prints nothing."""

from __future__ import annotations

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
    "cuda_initialized": torch.cuda.is_initialized(),
    "cuda_init_calls": len(lazy_inits),
    "missing_names": [n for n in names if not hasattr(binarize, n)],
}))
"""


def test_import_is_lean_and_silent():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"import binarize printed: {lines[:-1]}"  # only the probe's own line
    assert json.loads(lines[0]) == {"timm": [], "cuda_initialized": False, "cuda_init_calls": 0, "missing_names": []}
