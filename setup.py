"""Build of binarize's optional native kernel; the package metadata lives in pyproject.toml.

``binarize/runtime/bconv.c`` is plain C11 (no Python or torch headers), loaded with ctypes. It is
optional: without a working C compiler the install succeeds and binarize uses its pure-torch kernel.
The build embeds the SHA-256 of the source, so the loader can tell a stale in-place build from a
fresh one.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "binarize/runtime/bconv.c"
DIGEST = hashlib.sha256((Path(__file__).resolve().parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "binarize.runtime._bconv",
            sources=[SOURCE],
            define_macros=[("BCONV_SOURCE_SHA256", f'"{DIGEST}"')],
            optional=True,
            py_limited_api=True,
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11", "-fPIC", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
