"""DiT360's method: the FLUX transformer with the panoramic wrap, sampling, editing, the training
losses and the LoRA layer. It imports only the standard library, torch, einops, numpy and itself;
docs/METHOD.md maps the paper onto it."""
