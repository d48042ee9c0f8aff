"""Shared core of gpulab: options, errors, device probe, timing, Nsight Compute, results, experiments.

Import the submodules you need (``from gpulab.core import timing``); this package imports nothing heavy.
"""
