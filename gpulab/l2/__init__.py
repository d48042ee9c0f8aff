"""gpulab l2: L2 persistence and next-layer prefetch policies for DNN inference (imports nothing heavy)."""
