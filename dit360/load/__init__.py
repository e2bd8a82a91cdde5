"""Loading and formats: weight files and layouts, configs, LoRA files, images, datasets."""
