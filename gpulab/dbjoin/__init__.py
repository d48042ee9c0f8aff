"""gpulab join: an inner equi-join of two (key, payload) tables, as a CUDA hash join and as matrix products.

Modules: ``tables`` (generate, read and validate tables), ``reference`` (pandas.merge, pair comparison),
``hash_join.cu`` + ``hash_join_cuda`` (the CUDA C hash join through cupy), ``hash_join_model`` (the same
algorithm, kernel by kernel, as numba-compiled CPU code), ``tensorcore_join`` (Triton, tl.dot on +-1 bit
codes of hash-partitioned keys), ``torch_join`` (sort + searchsorted), ``aggregate`` (join-aggregate COUNT/SUM per key: definition, pandas and
torch references), ``tensorcore_aggregate`` (+ ``_kernel``: the same as tl.dot products), ``bench``,
``agg_bench`` (``--aggregate count|sum``) and ``cli``.
Nothing here imports torch, numba or triton at import time.
"""
