"""Speed: regional compilation and attention kernels."""
