"""prism_rt.torch_backend.checkpoint against models loaded directly by diffusers / transformers."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from prism_rt.errors import BackendError, CheckpointKeysError, MissingExtraError, ModelError  # noqa: E402
from prism_rt.torch_backend.checkpoint import SDComponents, load_checkpoint, sha256_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ldm_convert import to_ldm_checkpoint  # noqa: E402


# ------------------------------------------------------------------------------------- helpers
def ref_unet(d):
    return UNet2DConditionModel.from_pretrained(d, subfolder="unet", local_files_only=True).eval()


def ref_vae(d):
    return AutoencoderKL.from_pretrained(d, subfolder="vae", local_files_only=True).eval()


def ref_text(d):
    return CLIPTextModel.from_pretrained(d, subfolder="text_encoder", local_files_only=True).eval()


@torch.no_grad()
def unet_out(unet):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 16, 16, generator=g)
    c = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return unet(z, torch.tensor([981]), encoder_hidden_states=c).sample


@torch.no_grad()
def vae_out(vae):
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean = vae.encode(x).latent_dist.mean
    return mean, vae.decode(mean).sample


@torch.no_grad()
def text_out(te):
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])
    return te(ids).last_hidden_state


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def perturbed_sd(tiny_model_dir):
    """A 'fine-tuned' UNet: the tiny UNet with every tensor moved by noise."""
    g = torch.Generator().manual_seed(3)
    sd = ref_unet(tiny_model_dir).state_dict()
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def single_file(tiny_model_dir, tmp_path_factory):
    ckpt = to_ldm_checkpoint(ref_unet(tiny_model_dir), ref_vae(tiny_model_dir), ref_text(tiny_model_dir))
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    save_file(ckpt, str(path))
    return path, ckpt


# -------------------------------------------------------------------------------- diffusers folder
def test_diffusers_folder_matches_direct_load(tiny_model_dir, base):
    assert isinstance(base, SDComponents)
    assert max_diff(unet_out(base.unet), unet_out(ref_unet(tiny_model_dir))) == 0
    assert max_diff(text_out(base.text_encoder), text_out(ref_text(tiny_model_dir))) == 0
    for a, b in zip(vae_out(base.vae), vae_out(ref_vae(tiny_model_dir))):
        assert max_diff(a, b) == 0
    for m in (base.unet, base.vae, base.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert next(m.parameters()).dtype == torch.float32
    assert base.image_size == 128 and base.scaling_factor == pytest.approx(vae_scaling(tiny_model_dir))
    assert (base.tokenizer_dir / "tokenizer.json").is_file()
    assert base.scheduler_config["_class_name"] == "DDIMScheduler"
    assert base.scheduler_config["steps_offset"] == 1


def test_provenance(tiny_model_dir, base):
    prov = json.loads(json.dumps(base.provenance))  # JSON-serialisable
    assert prov["format"] == "diffusers" and prov["unet_weights"] is None
    unet_file = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    by_path = {w["path"]: w["sha256"] for w in prov["weights"]}
    assert len(by_path) == 3 and by_path[str(unet_file.resolve())] == sha256_file(unet_file)
    import hashlib
    assert by_path[str(unet_file.resolve())] == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    assert set(prov["versions"]) >= {"diffusers", "transformers", "torch"}


def test_dtype(tiny_model_dir):
    comps = load_checkpoint(tiny_model_dir, dtype="bfloat16")
    assert all(next(m.parameters()).dtype == torch.bfloat16
               for m in (comps.unet, comps.vae, comps.text_encoder))


# ------------------------------------------------------------------------------- UNet weights
@pytest.mark.parametrize("prefix", ["", "module."])
def test_unet_weights_applied(tiny_model_dir, base, perturbed_sd, tmp_path, prefix):
    path = tmp_path / "model.safetensors"
    save_file({prefix + k: v for k, v in perturbed_sd.items()}, str(path))
    comps = load_checkpoint(tiny_model_dir, unet_weights=path)
    ref = ref_unet(tiny_model_dir)
    ref.load_state_dict(perturbed_sd)
    out = unet_out(comps.unet)
    assert max_diff(out, unet_out(ref)) == 0
    assert max_diff(out, unet_out(base.unet)) > 1e-3
    assert comps.provenance["unet_weights"] == {"path": str(path.resolve()),
                                                "sha256": sha256_file(path)}


def test_unet_weights_wrong_keys(tiny_model_dir, perturbed_sd, tmp_path):
    sd = dict(perturbed_sd)
    dropped = "conv_out.weight"
    del sd[dropped]
    sd["module.bogus.weight"] = torch.zeros(3)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointKeysError) as err:
        load_checkpoint(tiny_model_dir, unet_weights=path)
    assert err.value.missing == [dropped] and err.value.unexpected == ["bogus.weight"]
    assert dropped in str(err.value) and "bogus.weight" in str(err.value)


def test_unet_weights_wrong_shape(tiny_model_dir, perturbed_sd, tmp_path):
    sd = dict(perturbed_sd)
    sd["conv_in.bias"] = torch.zeros(7)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelError, match=r"conv_in\.bias.*\(7,\).*\(32,\)"):
        load_checkpoint(tiny_model_dir, unet_weights=path)


def test_unet_weights_pickle(tiny_model_dir, perturbed_sd, tmp_path):
    path = tmp_path / "unet.bin"
    torch.save({"module." + k: v for k, v in perturbed_sd.items()}, path)
    with pytest.raises(ModelError, match="pickle.*--allow-pickle"):
        load_checkpoint(tiny_model_dir, unet_weights=path)
    comps = load_checkpoint(tiny_model_dir, unet_weights=path, allow_pickle=True)
    ref = ref_unet(tiny_model_dir)
    ref.load_state_dict(perturbed_sd)
    assert max_diff(unet_out(comps.unet), unet_out(ref)) == 0


# ------------------------------------------------------------------------------------ pickle folder
def test_pickle_folder_refused_unless_allowed(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    unet = ref_unet(tiny_model_dir)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ModelError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    assert "only pickle weights (diffusion_pytorch_model.bin)" in msg and "--allow-pickle" in msg
    comps = load_checkpoint(folder, allow_pickle=True)
    sd = comps.unet.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in unet.state_dict().items())
    # vs diffusers' own load of the same file: (bitwise weights in another memory layout can
    # take another CPU kernel path, ~1e-6 apart, so the same file is the exact reference)
    assert max_diff(unet_out(comps.unet), unet_out(ref_unet(folder))) == 0


# ------------------------------------------------------------------------------------------ errors
def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*diffusers Stable Diffusion folder"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("content", ["empty", "pngs"])
def test_not_a_model_folder(tmp_path, content):
    if content == "pngs":
        from PIL import Image
        for i in range(2):
            Image.new("L", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ModelError) as err:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "model_index.json" in str(err.value) and ".safetensors" in str(err.value)


def test_corrupt_safetensors(tiny_model_dir, tmp_path, single_file):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(single_file[0].read_bytes()[:1000])
    with pytest.raises(ModelError, match="not a valid safetensors"):
        load_checkpoint(bad, config=tiny_model_dir)
    with pytest.raises(ModelError, match="not a valid safetensors"):
        load_checkpoint(tiny_model_dir, unet_weights=bad)


def test_corrupt_component_in_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot load the vae"):
        load_checkpoint(folder)


# ------------------------------------------------------------------------------------- single file
def test_single_file_needs_config(single_file):
    with pytest.raises(ModelError, match="--config DIR"):
        load_checkpoint(single_file[0])


def vae_scaling(model_dir):
    import json

    return json.loads((model_dir / "vae" / "config.json").read_text())["scaling_factor"]


def test_single_file_matches_originals(tiny_model_dir, single_file):
    comps = load_checkpoint(single_file[0], config=tiny_model_dir)
    assert comps.provenance["format"] == "single-file"
    assert comps.provenance["weights"] == [
        {"path": str(single_file[0].resolve()), "sha256": sha256_file(single_file[0])}]
    assert max_diff(unet_out(comps.unet), unet_out(ref_unet(tiny_model_dir))) <= 1e-6
    assert max_diff(text_out(comps.text_encoder), text_out(ref_text(tiny_model_dir))) <= 1e-6
    for a, b in zip(vae_out(comps.vae), vae_out(ref_vae(tiny_model_dir))):
        assert max_diff(a, b) <= 1e-6
    assert comps.image_size == 128 and comps.scaling_factor == pytest.approx(vae_scaling(tiny_model_dir))
    assert comps.scheduler_config["_class_name"] == "DDIMScheduler"
    for m in (comps.unet, comps.vae, comps.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_single_file_missing_key(tiny_model_dir, single_file, tmp_path):
    ckpt = dict(single_file[1])
    del ckpt["first_stage_model.decoder.conv_out.bias"]
    path = tmp_path / "trunc.safetensors"
    save_file(ckpt, str(path))
    with pytest.raises(CheckpointKeysError) as err:
        load_checkpoint(path, config=tiny_model_dir)
    assert err.value.missing == ["decoder.conv_out.bias"] and "VAE" in str(err.value)


def test_single_file_pickle(tiny_model_dir, single_file, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": single_file[1]}, path)
    with pytest.raises(ModelError, match="pickle"):
        load_checkpoint(path, config=tiny_model_dir)
    comps = load_checkpoint(path, config=tiny_model_dir, allow_pickle=True)
    assert max_diff(unet_out(comps.unet), unet_out(ref_unet(tiny_model_dir))) <= 1e-6


def test_unet_state_dict_as_model(tiny_model_dir, perturbed_sd, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(perturbed_sd, str(path))
    with pytest.raises(ModelError, match="UNet weights"):
        load_checkpoint(path, config=tiny_model_dir)


def test_folder_missing_component(tiny_model_dir, tmp_path):
    folder = tmp_path / "novae"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelError, match="no vae/config.json"):
        load_checkpoint(folder)


def test_bad_device(tiny_model_dir):
    with pytest.raises(BackendError, match="nonsense"):
        load_checkpoint(tiny_model_dir, device="nonsense")


def test_missing_extra(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(MissingExtraError, match="'diffusers'.*prism-rt\\[torch\\]"):
        load_checkpoint(tiny_model_dir)
