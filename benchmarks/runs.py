"""Measured runs, one per fresh process, for memory.py and gpu.py: dit360's `generate` and
`edit_image`, diffusers' FluxPipeline, one transformer forward, and the preparation (random
weights written, the attention kernels probed). Each run reports seconds and peak memory per stage
(CUDA: allocated and reserved, reset per stage; CPU: peak RSS, reset per stage through
/proc/self/clear_refs, and RSS).

`spawn(kind, **args)` runs `python benchmarks/runs.py '{"kind": ..., ...}'` and returns the JSON
the child prints on its `RESULT ...` line; a child that fails (an OOM, a missing package, a
timeout) gives {"error": "..."} instead, so one bad run never ends a benchmark.
"""

import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # dit360 without an install; random_flux

from dit360.app.report import held_memory_gb, peak_memory_gb, reset_peak  # noqa: E402

PROMPT = "This is a panorama. A medieval castle on a hilltop surrounded by autumn forests."
GUIDANCE, SEED = 2.8, 0
MARK = "RESULT "  # the line of the child's stdout that carries its result


class Stages:
    """Seconds and peak memory of named stages, begun and ended by hand (diffusers' stages end
    inside its pipeline call, in a step callback). Nothing is freed between stages."""

    def __init__(self, device: str):
        self.device, self.out, self.name, self.start = str(device), {}, None, 0.0

    def begin(self, name: str) -> None:
        self.end()
        reset_peak(self.device)
        self.name, self.start = name, time.perf_counter()

    def end(self) -> None:
        if self.name is None:
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        peak, held = peak_memory_gb(self.device), held_memory_gb(self.device)
        self.out[self.name] = dict(s=seconds, peak=peak, held=held)
        self.name = None


def rss_gb() -> float:
    """The resident memory of this process now (GiB)."""
    return held_memory_gb("cpu")


def from_report(report) -> dict:
    """A dit360 Report as {stage: {s, peak, held}}."""
    return {
        k: dict(s=s, peak=report.peaks[k][0], held=report.peaks[k][1])
        for k, s in report.seconds.items()
    }


def save_image(image, path: str | None) -> str | None:
    """Write a PIL image as PNG (lossless: images are compared across runs)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return path


def image_stats(image) -> dict:
    """Mean and spread of the pixel values: a flat or saturated image shows here."""
    import numpy as np

    a = np.asarray(image, dtype=np.float64)
    return dict(pixel_mean=float(a.mean()), pixel_std=float(a.std()))


def run_dit360(
    base: str,
    height: int,
    width: int,
    steps: int,
    device: str,
    dtype: str,
    wrap_pad: int = 0,
    offload: str | None = None,
    image: str | None = None,
    compile: bool = False,
    fp8: bool = False,
    attention: str = "auto",
    t5_fp8: bool = False,
) -> dict:
    """dit360's `generate` (what sample.py runs), no LoRA."""
    import dit360.app.text  # noqa: F401  generate imports it (transformers) late: not in its seconds
    from dit360.app.generate import generate
    from dit360.app.options import SampleOptions

    base_gb = rss_gb()
    opts = SampleOptions(
        base=base, lora=None, height=height, width=width, steps=steps, wrap_pad=wrap_pad,
        device=device, dtype=dtype, offload=offload, seed=SEED, guidance=GUIDANCE,
        compile=compile, fp8=fp8, attention=attention, t5_fp8=t5_fp8,
    )  # fmt: skip
    start, log = time.perf_counter(), []
    pil, report = generate(PROMPT, opts, log=log.append)
    seconds = time.perf_counter() - start
    return dict(
        stages=from_report(report), seconds=seconds, steps=steps, base_gb=base_gb, log=log,
        image=save_image(pil, image), **image_stats(pil),
    )  # fmt: skip


def source_image(height: int, width: int):
    """A smooth synthetic panorama to edit (the same in every run), and the half mask: the left
    half kept (white), the right half generated."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    rgb = np.stack([np.sin(6.28 * x), np.cos(9.42 * y), np.sin(6.28 * (x + y))], axis=-1)
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    return Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)), Image.fromarray(mask)


def run_edit(
    base: str,
    height: int,
    width: int,
    steps: int | None,
    device: str,
    dtype: str,
    image: str | None = None,
) -> dict:
    """dit360's `edit_image` with a half mask and EditOptions' defaults (no LoRA)."""
    import dit360.app.text  # noqa: F401  as in run_dit360
    from dit360.app.editing import edit_image
    from dit360.app.options import EditOptions

    source, mask = source_image(height, width)
    base_gb = rss_gb()
    extra = {} if steps is None else dict(steps=steps)
    opts = EditOptions(base=base, lora=None, device=device, dtype=dtype, **extra)
    start, log = time.perf_counter(), []
    pil, report = edit_image(source, mask, PROMPT, opts, log=log.append)
    seconds = time.perf_counter() - start
    return dict(
        stages=from_report(report), seconds=seconds, steps=opts.steps, base_gb=base_gb, log=log,
        image=save_image(pil, image), **image_stats(pil),
    )  # fmt: skip


def run_diffusers(
    base: str,
    height: int,
    width: int,
    steps: int,
    device: str,
    dtype: str,
    offload: bool = False,
    image: str | None = None,
) -> dict:
    """diffusers' FluxPipeline from the same folder: on the device, or `enable_model_cpu_offload`.
    Stages: load (from_pretrained, to the device), text encoders (encode_prompt), denoise (until
    the last step's callback), decode (the rest of the call: VAE and post-processing)."""
    from diffusers import FluxPipeline

    from dit360.app.options import DTYPES

    base_gb, stages = rss_gb(), Stages(device)
    stages.begin("load")
    pipe = FluxPipeline.from_pretrained(base, torch_dtype=DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    stages.begin("text encoders")
    txt, vec, _ = pipe.encode_prompt(PROMPT, None, device=device, max_sequence_length=512)

    def on_step(pipe, i: int, t, kwargs: dict) -> dict:
        if i == steps - 1:
            stages.begin("decode")
        return {}

    stages.begin("denoise")
    pil = pipe(
        prompt_embeds=txt, pooled_prompt_embeds=vec, height=height, width=width,
        num_inference_steps=steps, guidance_scale=GUIDANCE, callback_on_step_end=on_step,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]  # fmt: skip
    stages.end()
    seconds = sum(s["s"] for s in stages.out.values())
    return dict(
        stages=stages.out, seconds=seconds, steps=steps, base_gb=base_gb,
        image=save_image(pil, image), **image_stats(pil),
    )  # fmt: skip


def run_forward(
    base: str,
    impl: str,
    height: int,
    width: int,
    wrap_pad: int = 1,
    out: str | None = None,
    repeats: int = 1,
) -> dict:
    """A float32 transformer forward on the CPU (no grad) at the tokens of height x width + 512
    text tokens: the peak RSS the first adds to the process, ours (`Flux`) or diffusers', and the
    seconds of the first and the fastest of `repeats`."""
    from dit360.app.panorama import Grid
    from dit360.load.config import from_diffusers_config

    p = from_diffusers_config(Path(base) / "transformer" / "config.json")
    grid, g = Grid.for_image(height, width, wrap_pad), torch.Generator().manual_seed(SEED)
    img = torch.randn(1, grid.tokens, p.in_channels, generator=g)  # (B, L_img, 64)
    txt = torch.randn(1, 512, p.context_in_dim, generator=g)  # (B, L_txt, 4096)
    y = torch.randn(1, p.vec_in_dim, generator=g)  # (B, 768)
    img_ids, txt_ids = grid.ids(1).float(), torch.zeros(1, 512, 3)
    t, guidance = torch.tensor([0.7]), torch.tensor([GUIDANCE])
    if impl == "dit360":
        from dit360.load.weights import load_flux

        model = load_flux(base, "cpu", torch.float32)

        def forward() -> torch.Tensor:
            return model(img, img_ids, txt, txt_ids, t, y, guidance)
    else:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(
            Path(base) / "transformer", torch_dtype=torch.float32
        ).eval()

        def forward() -> torch.Tensor:
            return model(
                hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False,
            )[0]  # fmt: skip

    gc.collect()
    before = rss_gb()
    reset_peak("cpu")
    start = time.perf_counter()
    with torch.no_grad():
        result = forward()
    seconds, peak = time.perf_counter() - start, peak_memory_gb("cpu")
    best = seconds
    for _ in range(repeats - 1):
        start = time.perf_counter()
        with torch.no_grad():
            forward()
        best = min(best, time.perf_counter() - start)
    if out:
        from safetensors.torch import save_file

        save_file({"out": result.contiguous()}, out)
    return dict(
        tokens=grid.tokens, before_gb=before, peak_gb=peak, added_gb=peak - before,
        seconds=seconds, best_s=best, out=out,
    )  # fmt: skip


def probe(device: str, dtype: str, shape: tuple[int, ...]) -> dict:
    """The environment, and which scaled-dot-product-attention backends run on q, k, v of `shape`
    (B, H, L, d), their seconds, and the backend and kernels PyTorch picks when left to choose."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dit360.app.options import DTYPES

    g = torch.Generator(device).manual_seed(SEED)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=DTYPES[dtype]) for _ in "qkv")

    def timed() -> float:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)  # warm-up
        sync(device)
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        sync(device)
        return time.perf_counter() - start

    backends = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        with sdpa_kernel(getattr(SDPBackend, name)), warnings.catch_warnings(record=True) as why:
            warnings.simplefilter("always")
            try:
                backends[name] = dict(s=timed())
            except (RuntimeError, torch.OutOfMemoryError) as e:  # the reasons come as warnings
                reasons = [str(w.message).splitlines()[0] for w in why] or [str(e)]
                backends[name] = dict(error="; ".join(dict.fromkeys(reasons))[:300])
    try:  # a private function: which backend F.scaled_dot_product_attention would pick
        choice = torch._fused_sdp_choice(q, k, v)
        chosen = next(n for n, m in SDPBackend.__members__.items() if int(m) == choice)
    except (AttributeError, RuntimeError, StopIteration) as e:
        chosen = f"unknown ({e})"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=activities) as prof:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            sync(device)
        words = ("attention", "fmha", "flash", "cudnn")
        ops = [e.key[:100] for e in prof.key_averages() if any(w in e.key for w in words)]
    except RuntimeError as e:
        ops = [f"profiler failed: {e}"]
    sdpa = dict(shape=list(shape), dtype=dtype, backends=backends, chosen=chosen, kernels=ops)
    return dict(environment=environment(), sdpa=sdpa)


def run_prepare(
    folder: str,
    sizes: str,
    device: str,
    dtype: str,
    hidden: int = 256,
    sdpa: list | None = None,
    t5_layers: int | None = None,
) -> dict:
    """Write (or reuse) a random FLUX.1-dev folder (sizes "full", "medium" or "tiny"; T5 cut to
    `t5_layers` blocks if given); with `sdpa` (a q/k/v shape), also probe the attention backends
    and report the environment."""
    from random_flux import FULL, TINY, medium, short_t5, write_flux_folder

    from dit360.app.options import DTYPES

    chosen = {"full": FULL, "tiny": TINY, "medium": medium(hidden)}[sizes]
    if t5_layers:
        chosen = short_t5(chosen, t5_layers)
    start = time.perf_counter()
    written = write_flux_folder(folder, chosen, device, DTYPES[dtype])
    sync(device)
    out = dict(written=written, s=time.perf_counter() - start, folder=folder)
    return out if sdpa is None else dict(out, **probe(device, dtype, tuple(sdpa)))


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def environment() -> dict:
    """GPU, library versions: what the numbers depend on."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    cuda = torch.cuda.is_available()
    free, total = torch.cuda.mem_get_info() if cuda else (0, 0)
    return dict(
        gpu=torch.cuda.get_device_name() if cuda else "none (CPU)", torch=torch.__version__,
        gpu_total_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1),
        cuda=torch.version.cuda, cpus=os.cpu_count(), python=sys.version.split()[0],
        **{k: version(k) for k in ("transformers", "diffusers", "safetensors")},
    )  # fmt: skip


KINDS = dict(
    dit360=run_dit360, edit=run_edit, diffusers=run_diffusers, forward=run_forward,
    prepare=run_prepare,
)  # fmt: skip


def spawn(kind: str, timeout: float | None = None, env: dict | None = None, **args) -> dict:
    """Run KINDS[kind](**args) in a fresh Python process (`env`: more environment variables); its
    result, with the process's wall seconds (`process_s`), or {"error": ...}."""
    return run_script(Path(__file__), dict(kind=kind, **args), timeout, env)


def run_script(script: Path, args: dict, timeout: float | None, env: dict | None = None) -> dict:
    """`python SCRIPT 'ARGS as JSON'` offline and quiet: the JSON of its last `RESULT ...` line
    with the process's wall seconds (`process_s`), or {"error": ...} (an OOM, a timeout)."""
    quiet = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    env = {**os.environ, **quiet, **(env or {})}
    cmd = [sys.executable, str(Path(script).resolve()), json.dumps(args)]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    lines = [line for line in r.stdout.splitlines() if line.startswith(MARK)]
    if r.returncode == 0 and lines:
        return dict(json.loads(lines[-1][len(MARK) :]), process_s=seconds)
    why = [line for line in r.stderr.strip().splitlines() if line.strip()] or ["(no output)"]
    return dict(error=f"exit {r.returncode}: {why[-1][:300]}", process_s=seconds)


def child(payload: str) -> None:
    """The child side of `spawn`: run one kind, print its result on a line of its own."""
    args = json.loads(payload)
    warnings.filterwarnings("ignore", message=".*trained at 1024x2048.*")
    try:
        result = KINDS[args.pop("kind")](**args)
    except torch.OutOfMemoryError as e:
        result = dict(error="out of memory: " + str(e).splitlines()[0][:200])
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    child(sys.argv[1])
