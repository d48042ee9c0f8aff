"""vajra: FP8 Llama-family serving (model side: loader, kernels, attention; engine side: scheduler, server)."""
