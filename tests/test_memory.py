"""Memory features keep the outputs: modulations computed ahead, modulation weights kept on the
CPU, the transformer's activations freed early. Each is compared with the plain per-step path."""

import copy

import pytest
import torch

from dit360.app import editing
from dit360.app.editing import edit, invert
from dit360.app.options import EditOptions
from dit360.app.panorama import Grid
from dit360.app.text import encode
from dit360.core.editing import rows
from dit360.core.sampling import Conditioning, schedule, step, timestep
from dit360.load.weights import load_flux
from dit360.memory.ahead import ahead, denoise, embedders, modulation_layers

PROMPTS = ["", "a lake under a cloudy sky", "a lake at sunset"]
H, W = 2, 4  # the token grid


@pytest.fixture(scope="module")
def ours(tiny_flux):
    """Our tiny transformer and three conditioning rows."""
    cond = Conditioning(*encode(tiny_flux, PROMPTS, "cpu", torch.float32))
    return load_flux(tiny_flux, "cpu", torch.float32), cond


def rows_of(cond: Conditioning, i: int) -> Conditioning:
    return rows(cond, slice(i, i + 1))


def latents(seed: int, grid: Grid) -> torch.Tensor:
    return torch.randn(1, grid.tokens, 64, generator=torch.Generator().manual_seed(seed))


def test_denoise_ahead_equals_per_step_forward(ours):
    """Denoising with every step's modulation computed ahead gives the plain loop's latents, bit
    for bit: the plain loop calls the model with (t, y, guidance) at every step."""
    model, cond = ours
    grid, sigmas, c = Grid(H, W, 1), schedule(4, H * W), rows_of(ours[1], 1)
    x = latents(0, grid)
    ids, txt = grid.ids(1, "cpu"), c.txt
    plain = x
    with torch.no_grad():
        for i in range(4):
            t = timestep(sigmas[i], torch.float32)[None] / 1000
            v = model(plain, ids, txt, c.txt_ids, t, c.vec, torch.tensor([2.8]))
            plain = step(plain, v, sigmas[i + 1] - sigmas[i])
        got = denoise(model, x, grid, c, sigmas, 2.8)
    assert torch.equal(got, plain)
    assert not torch.equal(got, x)


def test_denoise_needs_no_modulation_weights(ours):
    """Once computed ahead, denoising reads no modulation or embedder weight: with them moved to
    the meta device (no data) it gives the same latents."""
    model, cond = ours
    model = copy.deepcopy(model)  # we take weights away
    grid, sigmas, c = Grid(H, W, 1), schedule(3, H * W), rows_of(cond, 2)
    x = latents(1, grid)
    with torch.no_grad():
        expected = denoise(model, x, grid, c, sigmas, 2.8)
        c = ahead(model, c, sigmas[:-1], 2.8)
        for m in [*modulation_layers(model), *embedders(model)]:
            m.to("meta")
        got = denoise(model, x, grid, c, sigmas, 2.8)
    assert torch.equal(got, expected)


def test_ahead_refuses_unknown_times(ours):
    """A step whose modulation was not computed ahead fails loudly instead of using another's."""
    model, cond = ours
    grid, c = Grid(H, W, 1), rows_of(cond, 1)
    c = ahead(model, c, [0.5], 2.8)
    with torch.no_grad(), pytest.raises(KeyError, match="no modulation computed ahead"):
        denoise(model, latents(0, grid), grid, c, torch.tensor([0.75, 0.0]), 2.8)


def test_edit_ahead_equals_per_step_forward(ours, monkeypatch):
    """Inversion and editing with the modulations computed ahead (the pair and the target alone
    separately) equal the plain per-step forward, bit for bit."""
    model, cond = ours
    grid, sigmas, o = Grid(H, W, 1), schedule(6, H * W), EditOptions(gamma=0.6, eta=0.7)
    x0, y1, z = (latents(s, grid) for s in (2, 3, 4))
    keep = grid.wrap_mask(torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool), o.mask_pad)

    def run():
        with torch.no_grad():
            inv = invert(model, x0, y1, grid, rows_of(cond, 0), sigmas, o)
            return inv, *edit(model, inv, x0, z, keep, grid, rows(cond, slice(1, 3)), sigmas, o)

    inv, tgt, _ = run()
    monkeypatch.setattr(editing, "ahead", lambda model, c, times, g: c)  # plain per-step forward
    inv_plain, tgt_plain, _ = run()
    assert torch.equal(inv, inv_plain)
    assert torch.equal(tgt, tgt_plain)


def test_load_keeps_modulation_on_cpu(tiny_flux):
    """`on_cpu` fills the modulation layers and embedders in CPU memory, the rest on the device
    (the meta device stands in for a GPU here)."""
    model = load_flux(
        tiny_flux, "meta", torch.float32, on_cpu=lambda m: [*modulation_layers(m), *embedders(m)]
    )
    home = {id(p) for m in [*modulation_layers(model), *embedders(model)] for p in m.parameters()}
    devices = {(id(p) in home, p.device.type) for p in model.parameters()}
    assert devices == {(True, "cpu"), (False, "meta")}
    lin = model.double_blocks[0].img_mod.lin.weight
    assert lin.abs().sum() > 0  # filled from the file


def decoded(monkeypatch, module) -> list[torch.Tensor]:
    """The float images `module` turns into PIL images, recorded (to compare before rounding)."""
    seen, to_pil = [], module.to_pil
    monkeypatch.setattr(module, "to_pil", lambda x: seen.append(x.clone()) or to_pil(x))
    return seen


@pytest.mark.parametrize("lora", ["none", "merged", "adapters"])
def test_generate_offload_modes_equal_none(tiny_flux, tmp_path, monkeypatch, lora):
    """`generate` with offload model and blocks decodes the same image as none, bit for bit, with
    and without a LoRA (merged, or as adapters that stream with their blocks)."""
    from test_lora import dit360_lora

    from dit360.app import generate as gen
    from dit360.app.options import SampleOptions

    seen, streamed, stream = decoded(monkeypatch, gen), [], gen.stream
    monkeypatch.setattr(
        gen, "stream", lambda *a, **k: streamed.append(len(a[0])) or stream(*a, **k)
    )
    folder = None if lora == "none" else str(dit360_lora(tmp_path / "lora", r=4, alpha=4)[0])
    base = dict(base=tiny_flux, lora=folder, merge_lora=lora != "adapters", height=32, width=64)
    for mode in ("none", "model", "blocks"):
        with pytest.warns(UserWarning, match="trained at 1024x2048"):
            o = SampleOptions(**base, steps=2, device="cpu", dtype="fp32", offload=mode)
        _, report = gen.generate(PROMPTS[1], o, log=lambda _: None)
        assert list(report.peaks) == ["text encoders", "load transformer", "denoise", "decode"]
    assert streamed == [4]  # blocks mode streamed the 2 + 2 blocks
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])


def test_edit_offload_modes_equal_none(tiny_flux, monkeypatch):
    """`edit_image` with offload model and blocks gives the same image as none, bit for bit."""
    from PIL import Image

    from dit360.app import generate
    from dit360.app.editing import edit_image

    seen = decoded(monkeypatch, generate)  # the batch pipeline edits go through
    image = Image.fromarray((torch.rand(32, 64, 3, generator=torch.Generator().manual_seed(0))
                             * 255).byte().numpy())  # fmt: skip
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 24, 32))  # keep the left part
    for mode in ("none", "model", "blocks"):
        o = EditOptions(
            base=tiny_flux, lora=None, steps=3, gamma=0.5, device="cpu", dtype="fp32", offload=mode
        )
        edit_image(image, mask, PROMPTS[2], o, log=lambda _: None)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])


def test_reset_peak_before_cuda_starts(monkeypatch):
    """`--device cuda:0` reaches the first stage's peak reset before anything started CUDA, where
    resetting an indexed device's counters raises ("did you call init?"): it is not attempted
    then (nothing was allocated), and done once CUDA runs."""
    from dit360.app import report

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", calls.append)
    for started in (False, True):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda s=started: s)
        report.reset_peak("cuda:0")
    assert calls == ["cuda:0"]
