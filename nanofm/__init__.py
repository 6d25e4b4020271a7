"""nanofm: a small, readable, from-scratch foundation-model lifecycle in Python and PyTorch."""

__version__ = "0.1.0"
