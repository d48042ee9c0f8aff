"""CUDA C kernels run on the CPU (cuda_on_cpu.h, module.py), so the tests check the kernels' own source."""
