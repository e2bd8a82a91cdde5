"""Weight files: bad input gives errors that name the problem; hub ids resolve through the cache."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY_VAE, diffusers_transformer, diffusers_vae, save_autoencoder, save_transformer

from dit360.load.convert import convert_flux
from dit360.load.files import write_safetensors
from dit360.load.weights import load_autoencoder, load_flux

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory) -> Path:
    """A tiny transformer as one BFL-layout file."""
    root = tmp_path_factory.mktemp("src")
    save_transformer(diffusers_transformer(seed=5), root)
    return convert_flux(root, tmp_path_factory.mktemp("bfl") / "flux.safetensors")  # not in --base


def edited(src: Path, dst: Path, drop=(), add=None, reshape=()) -> Path:
    """A copy of a checkpoint with tensors dropped, added or cut in shape (keeps our metadata)."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(src).items() if k not in drop}
    tensors.update(add or {})
    for k in reshape:
        tensors[k] = tensors[k][:-1].clone()
    save_file(tensors, dst, metadata=metadata)
    return dst


def test_missing_tensor(bfl_file, tmp_path):
    """A missing tensor is named, with the file."""
    path = edited(bfl_file, tmp_path / "f.safetensors", drop=["double_blocks.1.img_attn.proj.bias"])
    with pytest.raises(ValueError, match=r"f\.safetensors.*missing.*double_blocks\.1\.img_attn"):
        load_flux(path)


def test_unexpected_tensor(bfl_file, tmp_path):
    """An unknown tensor is named, with the file that holds it."""
    path = edited(bfl_file, tmp_path / "f.safetensors", add={"lora.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected.*lora\.weight \(.*f\.safetensors\)"):
        load_flux(path)


def test_wrong_shape(bfl_file, tmp_path):
    """A tensor of the wrong shape is named with both shapes and its file."""
    path = edited(bfl_file, tmp_path / "f.safetensors", reshape=["final_layer.linear.weight"])
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight: \(63, 32\) in .*f\.safe"):
        load_flux(path)


def test_truncated_file(bfl_file, tmp_path):
    """A truncated download gives a clear error that says to download again."""
    path = tmp_path / "cut.safetensors"
    path.write_bytes(bfl_file.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated.*download again"):
        load_flux(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json, really")
    with pytest.raises(ValueError, match=r"cut\.safetensors.*not valid JSON"):
        load_flux(path)
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_flux(path)


def test_missing_shard(tmp_path):
    """A shard listed in the index but absent is named."""
    save_transformer(diffusers_transformer(), tmp_path)
    shard = sorted((tmp_path / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing.*{shard.name}"):
        load_flux(tmp_path)


def test_diffusers_missing_part(tmp_path):
    """A fused tensor with one of its diffusers parts missing names the parts found."""
    save_transformer(diffusers_transformer(), tmp_path)
    folder = tmp_path / "transformer"
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
        f.unlink()
    del tensors["transformer_blocks.0.attn.to_k.weight"]
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv\.weight needs 3"):
        load_flux(tmp_path)


def test_not_a_path_nor_repo(tmp_path):
    """A path that does not exist is reported as such."""
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_flux(tmp_path / "nowhere" / "x.safetensors")


def test_streaming_writer_matches_safetensors(tmp_path):
    """Our streaming writer produces a file safetensors reads back exactly, with metadata."""
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(())}
    tensors["d"] = torch.randn(4, 2).to(torch.bfloat16)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, specs, iter(tensors.items()), {"k": "v"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(back[k], v)


def test_failed_write_leaves_nothing(tmp_path):
    """A write that fails midway leaves neither the output nor a temporary file."""

    def broken():
        yield "a", torch.zeros(2)
        raise RuntimeError("disk gone")

    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}
    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "x.safetensors", specs, broken())
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "convert_weights.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_cli_from_hub_cache(tmp_path):
    """A repo id resolves through the Hugging Face cache (HF_HOME, offline) like a download."""
    model = diffusers_transformer(seed=9)
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-flux"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_transformer(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out.safetensors"
    r = run_cli("--base", "acme/tiny-flux", "--out", str(out), "--dtype", "bf16", env=env)
    assert r.returncode == 0, r.stderr
    loaded = load_file(out)
    assert loaded["img_in.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["img_in.weight"], model.x_embedder.weight.detach().bfloat16())
    r = run_cli("--base", "acme/not-cached", "--out", str(tmp_path / "o.safetensors"), env=env)
    assert r.returncode == 1 and "not in the Hugging Face cache" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_stale_temp_files_are_removed(tmp_path):
    """A write removes temporary files of dead processes on this machine, and only those."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".w.safetensors.tmp{dead.pid}.{host}"
    kept = [f".w.safetensors.tmp1.{host}", f".w.safetensors.tmp{dead.pid}.elsewhere"]
    kept += [f".v.safetensors.tmp{dead.pid}.{host}", ".w.safetensors.tmp"]  # not ours to remove
    stale.mkdir()  # a folder (a killed diffusers export) goes too
    for name in kept:
        (tmp_path / name).write_bytes(b"partial")
    write_safetensors(
        tmp_path / "w.safetensors", {"a": (torch.float32, (2,))}, [("a", torch.ones(2))]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "w.safetensors"])


def test_vae_unsharded_and_sharded_folders(tmp_path):
    """A diffusers vae/ folder, one file or shards, takes its config from config.json (norm groups
    8: not in the shapes); a BFL ae.safetensors ignores a config.json beside it."""
    vae = diffusers_vae(seed=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "one" / "vae")
    vae.save_pretrained(tmp_path / "shards" / "vae", max_shard_size="40KB")
    assert len(list((tmp_path / "one" / "vae").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "shards" / "vae").glob("*.safetensors"))) > 1
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image = vae.decode(z / TINY_VAE["scaling_factor"] + TINY_VAE["shift_factor"]).sample
        for src in (tmp_path / "one", tmp_path / "one" / "vae", tmp_path / "shards"):
            model = load_autoencoder(src)
            assert model.params.norm_num_groups == 8
            torch.testing.assert_close(model.decode(z), image, rtol=1e-4, atol=1e-5)
    path = save_autoencoder(model, tmp_path / "bfl" / "ae.safetensors")
    config = json.loads((tmp_path / "one" / "vae" / "config.json").read_text())
    (path.parent / "config.json").write_text(json.dumps({**config, "norm_num_groups": 4}))
    assert load_autoencoder(path.parent).params.norm_num_groups == 8  # from its metadata
