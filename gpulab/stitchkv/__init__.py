"""KV-cache stitching between a large prefill model and a small decode model (``gpulab kvstitch``)."""
