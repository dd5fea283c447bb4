"""Build of binarize's optional native kernel; the package metadata lives in pyproject.toml.

``binarize/runtime/bconv.c`` is plain C11 (no Python or torch headers), loaded with ctypes. It is
optional: without a working C compiler the install succeeds and binarize uses its pure-torch kernel.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "binarize.runtime._bconv",
            sources=["binarize/runtime/bconv.c"],
            optional=True,
            py_limited_api=True,
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c11", "-fPIC", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]
)
