"""Peak memory of weight conversion: a synthetic >= 1 GB FLUX checkpoint in the diffusers layout
(sharded, fp32) is converted to one BFL-layout bf16 file by convert_weights.py in a child process.

    python benchmarks/convert_memory.py [--hidden 2048] [--workdir /tmp/dit360-bench]

Prints the checkpoint size, its largest tensor, the child's peak RSS, and the RSS of a child that
only imports the same modules (the baseline every Python + torch process pays).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))  # dit360 without an install

from dit360.load.config import FluxParams, to_diffusers_config  # noqa: E402
from dit360.load.files import write_safetensors  # noqa: E402
from dit360.load.weights import FLUX_DIFFUSERS, meta_flux, split, their_keys  # noqa: E402

MB = 2**20


def write_synthetic(folder: Path, params: FluxParams, shard_bytes: int = 400 * MB) -> dict:
    """Write random weights in the diffusers layout, shard by shard, one tensor at a time."""
    specs = {}
    for name, p in meta_flux(params).state_dict().items():
        op, theirs = their_keys(name, FLUX_DIFFUSERS)
        for k, t in zip(theirs, split(op, p, len(theirs), params.hidden_size), strict=True):
            specs[k] = (torch.float32, tuple(t.shape))
    shards, current, size = [], {}, 0
    for k, spec in specs.items():
        current[k] = spec
        size += torch.Size(spec[1]).numel() * 4
        if size >= shard_bytes:
            shards, current, size = shards + [current], {}, 0
    shards += [current] if current else []
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = ((k, torch.randn(s[1]) * 0.02) for k, s in shard.items())
        write_safetensors(folder / name, shard, tensors)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(params)))
    return {k: torch.Size(s[1]).numel() * 4 for k, s in specs.items()}


def rss_during(code: str) -> tuple[float, float]:
    """(RSS after imports, peak RSS while running `code`) in MB, in a fresh process (Linux)."""
    probe = f"""
import convert_weights
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) / 1024
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
{code}
print(base, status("VmHWM:"))
"""
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT, capture_output=True)
    base, peak = out.stdout.split()[-2:]
    return float(base), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    params = FluxParams(
        hidden_size=args.hidden, num_heads=args.hidden // 128, depth=1, depth_single_blocks=2
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "transformer"
        sizes = write_synthetic(src, params)
        total, largest = sum(sizes.values()) / MB, max(sizes.values()) / MB
        ours_largest = max(p.numel() * 4 for p in meta_flux(params).state_dict().values()) / MB
        argv = ["--base", str(src), "--out", str(Path(tmp) / "flux.safetensors"), "--dtype", "bf16"]
        base, peak = rss_during(f"convert_weights.main({argv!r})")
    print(f"checkpoint: {total:.0f} MB fp32 in the diffusers layout (hidden {args.hidden})")
    print(f"largest tensor: {largest:.0f} MB as stored, {ours_largest:.0f} MB once fused (fp32)")
    print(f"RSS once python + torch + dit360 are imported: {base:.0f} MB")
    print(f"peak RSS converting to bf16: {peak:.0f} MB")
    ratio = (peak - base) / ours_largest
    print(f"above baseline: {peak - base:.0f} MB = {ratio:.1f} x the largest fused tensor")


if __name__ == "__main__":
    main()
