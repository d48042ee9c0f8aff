"""gpulab: one command-line toolkit for GPU systems research."""

__version__ = "0.1.0"
