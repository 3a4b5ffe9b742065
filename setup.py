"""Build the native IMA fast paths, evidence/ima/_accel.c (see evidence/ima/native.py).

Everything else about the package is in pyproject.toml. The extension links the libcrypto
that hashlib and cryptography use, so the build needs gcc and libssl-dev.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "evidence.ima._accel",
            sources=["evidence/ima/_accel.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]
)
