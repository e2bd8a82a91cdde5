"""dit360: DiT360 panorama generation on FLUX.1-dev in plain PyTorch."""
