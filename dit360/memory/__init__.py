"""Memory: offloading frozen weights, float8 weights, tiled VAE decoding."""
