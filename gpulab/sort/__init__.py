"""gpulab sort: CUDA bitonic sorts (global, shared, register-fused), transfers and CPU/library baselines.

Imports nothing heavy; see ``cli.py`` (``gpulab sort bench``), ``reference.py`` (numpy semantics),
``keys.py`` (order-preserving unsigned keys), ``schedule.py`` (launch schedule + its numpy model),
``bitonic.cu`` / ``cuda_sort.py`` (the CUDA C kernels and their cupy driver).
"""
