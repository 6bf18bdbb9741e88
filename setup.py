"""Build fused_wloss. The compiled kernels arrive in csrc/; until then this is a pure-Python package."""

from setuptools import setup

setup()
