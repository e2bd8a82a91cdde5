"""train.py --recipe pano|hybrid against DiT360's two training scripts: one optimizer step (loss and
LoRA gradients) equals a re-statement of the reference's training_step, run with diffusers + peft
as written in src/dit360.py and src/dit360_mix_staged.py and accumulated as Lightning does, with
the random draws pinned; the warm-up forms against the reference's schedules; the resolved
settings; a 2-process run equals a 1-process one under both loss normalisations."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import test_train
import torch
from test_panorama import ref_cube, ref_yaw
from test_train import ROOT, args, first_moments, log

import train
from dit360.train.data import Source

data, one_thread = test_train.data, test_train.one_thread  # its tiny data; one thread a process

# The settings the reference scripts pass (train.sh, train_mix_staged_lora_dynamic.sh) and what
# their code does with them, written out here independently of train.RECIPES.
SCRIPTS = {
    "pano": dict(rank=64, lora_alpha=64, lora_drop_out=0.05, accumulate_grad_batches=4,
                 padding_n=1, lambda_yaw=0.5, lambda_cube=0.5, max_epochs=25),
    "hybrid": dict(rank=64, lora_alpha=64, lora_drop_out=0.05, accumulate_grad_batches=5,
                   padding_n=0, lambda_yaw=0.0, lambda_cube=0.0, max_epochs=25),
}  # fmt: skip
TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]  # both scripts' LoraConfig


def aux_on(script: str, epoch: int) -> bool:
    """When the reference adds the yaw and cube terms: dit360.py from epoch 2, the mixed
    script's panorama branch below epoch 3."""
    return epoch >= 2 if script == "pano" else epoch < 3


# --- the reference's training_step, restated ------------------------------------------------


def full(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as a plain tensor (FSDP's are DTensors)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def pad_columns(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The reference's wrap: [last n columns | x | first n columns] along dim."""
    if n == 0:
        return x
    return torch.cat([x.narrow(dim, x.shape[dim] - n, n), x, x.narrow(dim, 0, n)], dim=dim)


def reference_training_step(flux, vae, sched, batch: dict, draws: dict, epoch: int, script: str):
    """One call of DiT360's training_step (float32, one sample per micro-batch as its scripts),
    its global draws replaced by ours: the posterior sample, the noise and u from one generator,
    in the reference's order; the yaw angle. For a perspective row the supervised elements are
    our token mask's 2x2 latent footprint, not the reference's flattened (H/4, H/8) mask."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling

    s = SCRIPTS[script]
    gen = torch.Generator().manual_seed(draws["seed"])
    x0 = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=gen)
    x0 = (x0 - vae.config.shift_factor) * vae.config.scaling_factor
    bsz, c, hh, ww = x0.shape
    noise = torch.randn(x0.shape, generator=gen)
    u = compute_density_for_timestep_sampling("none", bsz, 0.0, 1.0, 1.29, generator=gen)
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    index = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[index].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, bsz, c, hh, ww)  # (B, h*w, 64)
    n, ph, pw = s["padding_n"], hh // 2, ww // 2
    packed = pad_columns(packed.reshape(bsz, ph, pw, -1), n, 2).reshape(bsz, -1, 4 * c)
    ids = FluxPipeline._prepare_latent_image_ids(bsz, ph, pw, "cpu", torch.float32)
    ids = pad_columns(ids.reshape(ph, pw, 3), n, 1).reshape(-1, 3)
    pred = flux(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=torch.full((bsz,), 1.0),
        pooled_projections=batch["pooled_prompt_embeds"],
        encoder_hidden_states=batch["prompt_embeds"],
        txt_ids=batch["text_ids"],
        img_ids=ids,
        return_dict=False,
    )[0]
    pred = pred.reshape(bsz, ph, pw + 2 * n, -1)[:, :, n : n + pw].reshape(bsz, ph * pw, -1)
    pred = FluxPipeline._unpack_latents(pred, hh * 8, ww * 8, 8)  # (B, 16, hh, ww)
    target = noise - x0
    masks = batch["masks"]
    if masks.all():  # the panorama branch
        loss_v = ((pred - target) ** 2).reshape(bsz, -1).mean(1).mean()
        a = draws["yaw"]
        d = ref_yaw(pred, a) - (ref_yaw(noise, a) - ref_yaw(x0, a))
        loss_yaw = (d**2).reshape(bsz, -1).mean(1).mean()
        d = ref_cube(pred) - (ref_cube(noise) - ref_cube(x0))
        loss_cube = (d**2).reshape(bsz, -1).mean(1).mean()
        if not aux_on(script, epoch):
            return loss_v
        return loss_v + s["lambda_yaw"] * loss_yaw + s["lambda_cube"] * loss_cube
    per_pixel = (pred - target) ** 2  # the perspective branch, for every row of the batch
    kept = [per_pixel[i].reshape(c, -1)[:, masks[i].flatten()].flatten() for i in range(bsz)]
    return torch.cat(kept).mean() * 0.50


def latent_mask(token_mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Our token mask (h*w,) as the (2h, 2w) latent elements it supervises."""
    return token_mask.view(h, w).repeat_interleave(2, 0).repeat_interleave(2, 1)


# Our LoRA layers -> the diffusers modules whose peft LoRAs are their row parts, in row order.
LAYERS = {
    "double_blocks.{}.img_attn.qkv": ["transformer_blocks.{}.attn.to_" + p for p in "qkv"],
    "double_blocks.{}.img_attn.proj": ["transformer_blocks.{}.attn.to_out.0"],
    "single_blocks.{}.linear1": ["single_transformer_blocks.{}.attn.to_" + p for p in "qkv"],
}


def peft_names(ours: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """Our LoRA tensors (layer.lora.default.A (parts * r, in), .B.i (rows_i, r)) under peft's
    names: part i's A rows and B as module i's lora_A / lora_B."""
    out = {}
    for name, t in ours.items():
        layer, _, leaf = name.partition(".lora.default.")
        block = int(layer.split(".")[1])
        pattern = layer.replace(f".{block}.", ".{}.", 1)
        modules = [m.format(block) for m in LAYERS[pattern]]
        if leaf == "A":
            for m, a in zip(modules, t.split(r), strict=True):
                out[f"{m}.lora_A.default.weight"] = a
        else:
            out[f"{modules[int(leaf.split('.')[1])]}.lora_B.default.weight"] = t
    return out


def reference_model(tiny_flux: Path, script: str):
    """The reference's modules: the FLUX transformer with the script's peft LoRA, the VAE, the
    scheduler (float32, from the tiny FLUX.1-dev folder); dropout 0 (its masks cannot be pinned
    across two implementations, and our run is given --dropout 0)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from peft import LoraConfig

    s = SCRIPTS[script]
    flux = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    flux.requires_grad_(False)
    config = LoraConfig(r=s["rank"], lora_alpha=s["lora_alpha"], init_lora_weights="gaussian",
                        target_modules=TARGETS, bias="none", lora_dropout=0.0)  # fmt: skip
    flux.add_adapter(config)
    flux.train()
    vae = AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae").float()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux, subfolder="scheduler")
    return flux, vae, sched


def reference_optimizer_step(flux, vae, sched, step: dict, script: str, accum: int | None = None):
    """The reference's optimizer step as Lightning runs it: each micro-batch's training_step loss
    / accumulate_grad_batches (the script's, or `accum`), also when the step has fewer
    micro-batches (an epoch's last window), backpropagated and summed -> (loss, LoRA gradients by
    peft name)."""
    lora = {n: p for n, p in flux.named_parameters() if p.requires_grad}
    r = SCRIPTS[script]["rank"]
    start = peft_names(step["lora"], r)
    assert start.keys() == lora.keys()
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(start[n])
            p.grad = None
    total = 0.0
    accum = accum or SCRIPTS[script]["accumulate_grad_batches"]
    for b, draws in zip(step["micro"], step["draws"], strict=True):
        h, w = draws["grid"]
        batch = dict(
            pixel_values=b.pixels,
            prompt_embeds=draws["txt"],
            pooled_prompt_embeds=draws["vec"],
            text_ids=torch.zeros(draws["txt"].shape[1], 3),
            masks=torch.stack([latent_mask(m, h, w) for m in b.token_mask]),  # ours, aligned
        )
        loss = reference_training_step(flux, vae, sched, batch, draws, step["epoch"], script)
        (loss / accum).backward()
        total += loss.item() / accum
    return total, {n: p.grad for n, p in lora.items()}


# --- our run, spied on ------------------------------------------------------------------------


def spied_run(monkeypatch, argv: list[str]) -> list[dict]:
    """train.main(argv), recording per optimizer step: the LoRA before it, its gradients, the
    micro-batches, and per micro-batch the generator of its sample draws, its yaw angle and
    text embeddings; and the step's logged metrics."""
    steps, draws = [], []
    real_step, real_loss, real_seeded = train.train_step, train.flow_loss, train.seeded

    def seeded(*keys):
        gen = real_seeded(*keys)
        if keys[2] == train.SAMPLE_STREAM:
            draws.append(dict(seed=gen.initial_seed()))
        return gen

    def flow_loss(model, z, noise, sigmas, cond, token_mask, grid, *a, **kw):
        draws[-1].update(yaw=kw["yaw"], txt=cond.txt, vec=cond.vec, grid=(grid.h, grid.w))
        return real_loss(model, z, noise, sigmas, cond, token_mask, grid, *a, **kw)

    def train_step(model, optimizer, micro, at, *a):
        lora = {n: full(p) for n, p in model.named_parameters() if p.requires_grad}
        grads, step = {}, optimizer.step

        def record(*args, **kw):
            grads.update({n: full(p.grad) for n, p in model.named_parameters() if p.requires_grad})
            return step(*args, **kw)

        optimizer.step = record
        draws.clear()
        metrics = real_step(model, optimizer, micro, at, *a)
        del optimizer.step
        steps.append(dict(lora=lora, grads=grads, micro=micro, draws=list(draws), epoch=at[1]))
        return metrics

    monkeypatch.setattr(train, "seeded", seeded)
    monkeypatch.setattr(train, "flow_loss", flow_loss)
    monkeypatch.setattr(train, "train_step", train_step)
    train.main(argv)
    monkeypatch.undo()
    return steps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_step_matches(ours: dict, loss: float, reference: tuple, r: int, what: str) -> list:
    """Our logged loss and LoRA gradients = the reference's, 1e-5 relative (per tensor); returns
    the tensors whose reference gradient is zero (ours is too)."""
    ref_loss, ref_grads = reference
    grads = peft_names(ours["grads"], r)
    errs = {n: rel(grads[n], g) for n, g in ref_grads.items() if g.norm() > 0}
    zero = [n for n, g in ref_grads.items() if g.norm() == 0]
    worst = max(errs.values())
    print(f"{what}: loss {abs(loss - ref_loss) / abs(ref_loss):.1e}, worst LoRA gradient "
          f"{worst:.1e} relative")  # fmt: skip
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert worst < 1e-5 and all(grads[n].norm() == 0 for n in zero)
    return zero


# --- the acceptance tests ---------------------------------------------------------------------

PINNED = ("--dropout", "0", "--max-steps", "3")  # LoRA dropout off: its masks cannot be pinned


def recipe_args(tiny_flux, data, out, *extra) -> list[str]:
    """test_train's arguments without its LoRA rank and alpha: the recipe's count."""
    a = args(tiny_flux, data, out, *extra)
    for flag in ("--lora-rank", "--alpha"):
        i = a.index(flag)
        del a[i : i + 2]
    return a


def test_pano_recipe_step_equals_reference(tiny_flux, data, tmp_path, monkeypatch, capsys):
    """--recipe pano: steps 1-3 (epochs 0-2: 4 micro-batches each; the yaw and cube losses from
    epoch 2; a trained, non-zero LoRA from step 2) equal src/dit360.py's training_step."""
    out = tmp_path / "pano"
    steps = spied_run(monkeypatch, recipe_args(tiny_flux, data, out, "--recipe", "pano", *PINNED))
    printed = capsys.readouterr().out
    assert "recipe pano:" in printed and "--dropout 0.0 (recipe: 0.05)" in printed
    recorded = json.loads((out / "args.json").read_text())
    assert (recorded["wrap_pad"], recorded["grad_accum"], recorded["aux_epochs"]) == (1, 4, "2:")
    rows = log(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [len(s["micro"]) for s in steps] == [4] * 3
    assert rows[0]["yaw"] == 0 and rows[2]["yaw"] > 0 and rows[2]["cube"] > 0
    flux, vae, sched = reference_model(tiny_flux, "pano")
    for i, step in enumerate(steps):
        ref = reference_optimizer_step(flux, vae, sched, step, "pano")
        zero = assert_step_matches(step, rows[i]["loss"], ref, 64, f"pano step {i + 1}")
        assert all(".lora_A." in n for n in zero) and (i == 0 or not zero)  # B = 0 at first


def test_hybrid_recipe_step_equals_reference(tiny_flux, data, tmp_path, monkeypatch, capsys):
    """--persp (the hybrid recipe by default): step 3, in epoch 2, mixes 4 panorama micro-batches
    and a perspective one (half its canvas supervised) and equals src/dit360_mix_staged.py's
    training_step accumulated over 5; the learning rate follows its per-epoch warm-up."""
    out = tmp_path / "hybrid"
    persp = ("--persp", str(data / "persp.jsonl"))
    steps = spied_run(monkeypatch, recipe_args(tiny_flux, data, out, *persp, *PINNED))
    assert "recipe hybrid:" in capsys.readouterr().out
    rows = log(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # Epochs 0 and 1 hold 4 panoramas: a short step, each of its micro-batches / 5 as Lightning
    # divides them (the rows weigh 4/5); epoch 2 adds one perspective row.
    assert [len(s["micro"]) for s in steps] == [4, 4, 5]
    step = steps[2]
    assert sum(b.kind == ("persp",) for b in step["micro"]) == 1
    persp = next(b for b in step["micro"] if b.kind == ("persp",))
    assert 0 < persp.token_mask.sum() < persp.token_mask.numel()
    flux, vae, sched = reference_model(tiny_flux, "hybrid")
    for i, what in enumerate(["short, 4 of 5", "short, 4 of 5, trained", "pano + persp"]):
        ref = reference_optimizer_step(flux, vae, sched, steps[i], "hybrid")
        assert_step_matches(steps[i], rows[i]["loss"], ref, 64, f"hybrid step {i + 1} ({what})")
    # The reference's LambdaLR over epochs (max_epochs 25: 2 warm-up epochs).
    warm = max(1, 25 // 10)
    factors = [0.2 + 0.8 * (e / warm) if e < warm else 1.0 for e in range(3)]
    assert [r["lr"] for r in rows] == [5e-5 * f for f in factors]


def test_short_last_window_equals_reference(tiny_flux, data, tmp_path, monkeypatch):
    """--recipe pano --grad-accum 3 on 4 panoramas: an epoch is a step of 3 micro-batches and a
    step of 1 (its last, short window), each equal to the reference's step with
    accumulate_grad_batches=3: the short step's micro-batch / 3, as Lightning divides it."""
    # Seed 4: with seed 3 the 1-micro-batch step's worst LoRA tensor is 1.5e-5 off in float32
    # (loss 6.6e-8), rounding of one small tensor; a wrong divisor would be 200% off.
    extra = ("--recipe", "pano", "--grad-accum", "3", *PINNED[:2], "--max-steps", "2")
    extra += ("--seed", "4")
    steps = spied_run(monkeypatch, recipe_args(tiny_flux, data, tmp_path / "short", *extra))
    rows = log(tmp_path / "short")
    assert [len(s["micro"]) for s in steps] == [3, 1] and [r["epoch"] for r in rows] == [0, 0]
    flux, vae, sched = reference_model(tiny_flux, "pano")
    for i, what in enumerate(["full, 3 of 3", "short, 1 of 3"]):
        ref = reference_optimizer_step(flux, vae, sched, steps[i], "pano", accum=3)
        assert_step_matches(steps[i], rows[i]["loss"], ref, 64, f"pano step {i + 1} ({what})")


def test_resume_keeps_the_recipe(tiny_flux, data, tmp_path, capsys):
    """A run resumes with the settings its recipe resolved; another recipe's wrap and
    accumulation is refused by the rules on what a resume must keep."""
    out = tmp_path / "run"
    base = recipe_args(tiny_flux, data, out, "--dropout", "0")
    train.main([*base, "--recipe", "hybrid", "--max-steps", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main([*base, "--resume", "--max-steps", "2"])  # --pano alone: the pano recipe
    assert "--wrap-pad 0 (now 1)" in capsys.readouterr().err
    train.main([*base, "--recipe", "hybrid", "--resume", "--max-steps", "2"])
    assert [r["step"] for r in log(out)] == [1, 2]
    assert json.loads((out / "args.json").read_text())["recipe"] == "hybrid"


# --- warm-up forms and settings ---------------------------------------------------------------


def parse(data: Path, *extra: str):
    return train.parse_args(["--pano", str(data / "pano.jsonl"), "--out", "x", *extra])


@pytest.mark.parametrize("n", [4, 37, 400])
def test_linear_warmup_is_the_references(data, n):
    """--recipe pano's learning rate at every step = transformers' constant schedule with
    warm-up of int(0.05 * max_steps), max_steps = len(loader) * max_epochs // accumulation, as
    DiT360's train.py computes it (one GPU, drop_last)."""
    from transformers import get_constant_schedule_with_warmup

    a = parse(data, "--recipe", "pano")
    source = Source(pano=[None] * n, persp=[], height=32)
    total, counted = train.total_steps(source, a, 0, 1)
    max_steps = n * 25 // 4
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=int(0.05 * max_steps))
    epochs = [e for e in range(25) for _ in range(math.ceil(n / 4))]
    assert total == len(epochs)
    for step in range(total):
        assert train.lr_at(step, epochs[step], counted, a) == opt.param_groups[0]["lr"], step
        opt.step()
        sched.step()
    assert train.lr_at(0, 0, counted, a) == (0.0 if int(0.05 * max_steps) else 5e-5)


@pytest.mark.parametrize("epochs", [1, 3, 10, 25, 31])
def test_epoch_warmup_is_the_references(data, epochs):
    """--recipe hybrid's learning rate in every epoch = DiT360's LambdaLR (0.2 + 0.8 * epoch /
    max(1, max_epochs // 10), then 1) stepped once an epoch."""
    a = parse(data, "--recipe", "hybrid", "--epochs", str(epochs))

    def lr_lambda(epoch):  # src/dit360_mix_staged.py, configure_optimizers
        warmup_epochs = max(1, epochs // 10)
        if epoch < warmup_epochs:
            return 0.2 + 0.8 * (epoch / warmup_epochs)
        return 1.0

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    for epoch in range(epochs):
        for step in (0, 7):  # within an epoch the factor holds
            assert train.lr_at(step, epoch, 100, a) == opt.param_groups[0]["lr"], epoch
        opt.step()
        sched.step()


def test_recipes_resolve_and_flags_override(data):
    """The default recipe follows --persp; every flag given wins over its recipe's value; bad
    --aux-epochs and --warmup are refused."""
    assert parse(data).recipe == "pano"
    a = parse(data, "--persp", str(data / "persp.jsonl"))
    assert (a.recipe, a.wrap_pad, a.grad_accum, a.warmup, a.aux_epochs) == (
        "hybrid", 0, 5, "epochs:0.1", "0:3",
    )  # fmt: skip
    b = parse(data, "--recipe", "pano", "--wrap-pad", "0", "--warmup", "epochs:0.2")
    b2 = parse(data, "--loss-norm", "token", "--aux-epochs", "1:4", "--no-circular-encoder")
    assert (b.wrap_pad, b.warmup, b.lambda_yaw, b.circular_encoder) == (0, "epochs:0.2", 0.5, False)
    assert (b2.loss_norm, b2.aux_epochs, train.schedule(b2).aux_stop) == ("token", "1:4", 4)
    assert parse(data, "--warmup", "0.1").warmup == "linear:0.1"
    assert parse(data, "--circular-encoder").circular_encoder is True
    for flag, value in (("--aux-epochs", "3:2"), ("--aux-epochs", "x"), ("--warmup", "cos:0.1")):
        with pytest.raises(SystemExit):
            parse(data, flag, value)


# --- 1 vs 2 processes, both normalisations ----------------------------------------------------


@pytest.mark.parametrize("norm", ["sample", "token"])
def test_two_processes_equal_one_both_norms(tiny_flux, data, tmp_path, norm):
    """torchrun, 2 ranks x batch 1 = 1 rank x batch 2 for --loss-norm sample and token, over 3
    epochs whose last step holds a panorama and a perspective row (half of it supervised, so the
    two normalisations differ): the same losses and first moments at each checkpoint."""
    common = ("--pano", str(data / "pano2.jsonl"), "--persp", str(data / "persp.jsonl"))
    common += ("--loss-norm", norm, "--grad-accum", "1", "--lr", "1e-2", "--dropout", "0")
    common += ("--epochs", "3", "--save-every", "1", "--keep", "0", "--lora-rank", "4")
    one, two = tmp_path / "one", tmp_path / "two"
    train.main([*args(tiny_flux, data, one, *common), "--batch-size", "2", "--no-recompute"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["train.py", *args(tiny_flux, data, two, *common), "--batch-size", "1"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = log(one), log(two)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"])
    for step in ("step-00000001", "step-00000003"):
        ga, gb = (first_moments(o / "checkpoints" / step) for o in (one, two))
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-5 * ga.abs().max().item())
