"""``prism-rt`` run as a user runs it: in a subprocess, on a model this project did not build.

The model is the tiny Stable Diffusion of diffusers' own test-suite (``get_dummy_components`` in
diffusers' tests/pipelines/stable_diffusion/test_stable_diffusion.py: a 2-level UNet and a 2-level
VAE, so 64-px images and 32×32 latents), with the real CLIP tokenizer and SD v1.5's PNDM scheduler
config, saved by ``StableDiffusionPipeline.save_pretrained``. Every run is checked through what a
user sees: exit code, stderr, the files written and ``result.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

SOURCE = "Chest X-ray showing Support Devices"
TARGET = "Chest X-ray showing Pleural Effusion"
TARGET_2 = "Chest X-ray showing small Pleural Effusion"
STEPS = 4
SELF = "0.4,0.6"
SELF_VALUES = (0.4, 0.6)
EXIT_INTERNAL = 70  # prism_rt.cli.EXIT_INTERNAL: a bug, never the answer to bad input


# -- running the CLI -------------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ)
    # One thread per process: torch's default of one thread per core slows these tiny graphs down
    # by an order of magnitude when the cores are shared with other processes.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "prism_rt.cli", *[str(a) for a in args]]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=timeout)


def run_many(argvs: list) -> list:
    """Several independent CLI runs, two at a time (each process runs one thread)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda argv: run_cli(*argv), argvs))


def _show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, _show(proc)
    assert "Traceback" not in proc.stderr, _show(proc)
    assert not [line for line in proc.stderr.splitlines() if line.startswith(("error:", "internal error:"))], _show(proc)
    return proc


# -- inputs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def diffusers_model_dir(tmp_path_factory) -> Path:
    """diffusers' dummy StableDiffusionPipeline components, saved as an SD folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from prism_export.clip_vocab import write_clip_tokenizer_files

    root = tmp_path_factory.mktemp("diffusers-dummy")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    torch.manual_seed(0)
    # SD v1.5's scheduler folder: PNDM with skip_prk_steps and the scaled-linear betas
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=49408))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(root / "clip-tokenizer"))
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = root / "sd-dummy"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """Synthetic 80×60 radiograph-like PNGs, 8- and 16-bit grayscale."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    y, x = np.mgrid[0:60, 0:80].astype(np.float64)
    wave = np.sin(x / 9.0) * np.cos(y / 7.0) + 0.3 * (x / 80.0)
    png8, png16 = folder / "cxr8.png", folder / "cxr16.png"
    Image.fromarray(np.clip(128 + 80 * wave, 0, 255).astype(np.uint8), mode="L").save(png8)
    Image.fromarray(np.clip(32768 + 20000 * wave, 0, 65535).astype(np.uint16)).save(png16)
    assert Image.open(png8).mode == "L" and Image.open(png16).mode == "I;16"
    return {"png8": png8, "png16": png16}


# -- the one-shot edit runs ------------------------------------------------------------------------

# name: (image, inversion, targets, blend words); every run but the first asks for --extras
LEAN_RUN = "dicom-ddim"
RUNS = {
    "png8-direct": ("png8", "direct", (TARGET,), None),
    "png8-ddim-blend": ("png8", "ddim", (TARGET,), "Devices,Effusion"),
    "png16-direct-blend-2targets": ("png16", "direct", (TARGET, TARGET_2), "Devices,Effusion"),
    "dicom-ddim": ("dicom", "ddim", (TARGET,), None),
}


def _edit_args(model, image, inversion, targets, blend, out) -> list:
    args = ["edit", "--model", model, "--image", image, "--prompt", SOURCE, "--inversion", inversion,
            "--steps", STEPS, "--self-replace", SELF, "--no-progress", "--out", out]
    if Path(out).name != LEAN_RUN:
        args.append("--extras")
    for target in targets:
        args += ["--target", target]
    if blend:
        args += ["--blend-words", blend]
    return args


@pytest.fixture(scope="module")
def edit_runs(diffusers_model_dir, images, dicom_path, tmp_path_factory) -> dict:
    """Every configuration of RUNS run once, and `prism-rt invert` of the first (two at a time)."""
    root = tmp_path_factory.mktemp("edits")
    runs = {}
    for name, (kind, inversion, targets, blend) in RUNS.items():
        image = Path(dicom_path if kind == "dicom" else images[kind])
        runs[name] = dict(out=root / name, image=image, kind=kind, inversion=inversion, targets=targets, blend=blend,
                          argv=_edit_args(diffusers_model_dir, image, inversion, targets, blend, root / name))
    # the inversion that `prism-rt edit --inversion-file` reuses in test_invert_then_edit_equals_one_shot
    runs["invert"] = dict(out=root / "inv.npz", argv=[
        "invert", "--model", diffusers_model_dir, "--image", images["png8"], "--prompt", SOURCE,
        "--inversion", "direct", "--steps", STEPS, "--no-progress", "--save", root / "inv.npz"])
    for run, proc in zip(runs.values(), run_many([r["argv"] for r in runs.values()])):
        run["proc"] = proc
    return runs


def _finished(run: dict) -> dict:
    ok(run["proc"])
    return dict(run, result=json.loads((run["out"] / "result.json").read_text()))


def _expected_names(n_targets: int, extras: bool = True, dicom: bool = False) -> set[str]:
    """By default what a user looks at (counterfactuals, result.json, figure.png); --extras adds
    the reconstruction and one difference map per counterfactual; a DICOM input adds a .dcm twin
    of each counterfactual."""
    names = {"result.json", "figure.png"} | ({"reconstruction.png"} if extras else set())
    for k in range(1, n_targets + 1):
        for s in SELF_VALUES:
            names |= {f"edit-{k}-s{s:.2f}.png"} | ({f"diff-{k}-s{s:.2f}.png"} if extras else set())
            names |= {f"edit-{k}-s{s:.2f}.dcm"} if dicom else set()
    return names


def _input_size(image: Path, kind: str) -> tuple[int, int]:
    """(width, height) of the input as stored."""
    if kind == "dicom":
        import pydicom

        ds = pydicom.dcmread(image, stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    from PIL import Image

    with Image.open(image) as im:
        return im.size


@pytest.mark.parametrize("name", list(RUNS))
def test_edit_writes_the_promised_outputs(edit_runs, name):
    from PIL import Image

    run = _finished(edit_runs[name])
    out, result, targets = run["out"], run["result"], run["targets"]
    n_items = len(targets) * len(SELF_VALUES)

    # files: one edit per target × self value, result.json, figure.png (+ reconstruction and diffs)
    extras = name != LEAN_RUN
    assert {p.name for p in out.iterdir()} == _expected_names(len(targets), extras, dicom=run["kind"] == "dicom")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging folder left behind"
    assert f"wrote {n_items} counterfactual(s) to {out}" in run["proc"].stdout

    # the outputs are mapped back to the input's geometry, at the input's bit depth
    width, height = _input_size(run["image"], run["kind"])
    mode = "L" if run["kind"] == "png8" else "I;16"
    pngs = [f"edit-{k}-s{s:.2f}.png" for k in range(1, len(targets) + 1) for s in SELF_VALUES]
    for png in (["reconstruction.png"] if extras else []) + pngs:
        with Image.open(out / png) as im:
            assert (im.size, im.mode) == ((width, height), mode), png
    for k in range(1, len(targets) + 1 if extras else 1):
        for s in SELF_VALUES:
            with Image.open(out / f"diff-{k}-s{s:.2f}.png") as im:
                assert im.mode == "RGB"
                assert im.size[1] == height and im.size[0] > width  # the image plus its colour scale

    # result.json
    assert result["source_prompt"] == SOURCE
    assert result["inversion"]["method"] == run["inversion"]
    error = result["reconstruction_error"]
    assert np.isfinite(error) and error >= 0
    if run["inversion"] == "direct":
        assert error <= 1e-4
    items = result["items"]
    assert [i["name"] for i in items] == [f"edit-{k}-s{s:.2f}" for k in range(1, len(targets) + 1) for s in SELF_VALUES]
    assert [i["target"] for i in items] == [t for t in targets for _ in SELF_VALUES]
    assert [i["self_replace"] for i in items] == [s for _ in targets for s in SELF_VALUES]
    for item in items:
        assert item["files"] == {"name": item["name"], "edit": f"{item['name']}.png",
                                 **({"diff": "diff-" + item["name"].removeprefix("edit-") + ".png"} if extras else {}),
                                 **({"dicom": f"{item['name']}.dcm"} if run["kind"] == "dicom" else {})}
        assert 0 < item["mean_abs_diff"] <= 1  # a different caption changes the image
        blend_keys = {"mask_fraction", "mean_abs_diff_inside_mask", "mean_abs_diff_outside_mask"}
        if run["blend"]:
            assert blend_keys <= item.keys(), item
            fraction, inside, outside = (item[k] for k in ("mask_fraction", "mean_abs_diff_inside_mask",
                                                           "mean_abs_diff_outside_mask"))
            assert 0 <= fraction <= 1
            assert (inside is None) == (fraction == 0) and (outside is None) == (fraction == 1)
            # the mean over the image is the mask-weighted mean of the two parts
            whole = fraction * (inside or 0.0) + (1 - fraction) * (outside or 0.0)
            assert whole == pytest.approx(item["mean_abs_diff"], rel=1e-4, abs=1e-6)
        else:
            assert not blend_keys & item.keys(), item
    assert {"encode_s", "edit_loop_s", "decode_s", "load_s"} <= result["timings"].keys()
    assert all(v >= 0 for v in result["timings"].values())

    # UNet batch items, counted by hand: the direct source has no unconditional half
    if run["inversion"] == "direct":
        edit_items = STEPS * (1 + 2 * n_items)
    else:
        edit_items = STEPS * 2 * (1 + n_items)
    assert result["counts"]["unet_items"] == edit_items
    assert result["counts"]["unet_calls"] == STEPS
    assert result["inversion"]["counts"]["unet_items"] == STEPS  # one conditional item per inversion step
    assert f"{edit_items} UNet items" in run["proc"].stdout

    # provenance: the exact input bytes, and the model's 64-px geometry (2-level VAE)
    source = result["provenance"]["source_image"]
    assert source["sha256"] == hashlib.sha256(run["image"].read_bytes()).hexdigest()
    assert source["kind"] == ("dicom" if run["kind"] == "dicom" else "png")
    assert source["bit_depth"] == {"png8": 8, "png16": 16, "dicom": 15}[run["kind"]]
    fit = result["provenance"]["fit"]
    assert (fit["size"], fit["orig_width"], fit["orig_height"]) == (64, width, height)


def test_file_names_do_not_depend_on_the_inversion(edit_runs):
    names = {name: sorted(p.name for p in _finished(edit_runs[name])["out"].iterdir())
             for name in ("png8-direct", "png8-ddim-blend")}
    assert names["png8-direct"] == names["png8-ddim-blend"]


def test_invert_then_edit_equals_one_shot(edit_runs, diffusers_model_dir, images, tmp_path):
    """`prism-rt invert --save` + `prism-rt edit --inversion-file` = one `prism-rt edit`, pixel for pixel."""
    from PIL import Image

    one_shot = _finished(edit_runs["png8-direct"])
    saved = edit_runs["invert"]["out"]
    proc = ok(edit_runs["invert"]["proc"])
    assert f"wrote the direct inversion of {images['png8']} to {saved}" in proc.stdout
    with np.load(saved, allow_pickle=False) as data:
        assert data["trajectory"].shape == (STEPS + 1, 1, 4, 32, 32)  # 64-px model, 32×32 latent

    out = tmp_path / "from-file"
    ok(run_cli("edit", "--model", diffusers_model_dir, "--inversion-file", saved, "--target", TARGET,
               "--self-replace", SELF, "--no-progress", "--extras", "--out", out))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_shot["out"].iterdir())
    for png in sorted(p.name for p in out.glob("*.png")):
        with Image.open(out / png) as a, Image.open(one_shot["out"] / png) as b:
            assert a.size == b.size and a.mode == b.mode, png
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{png} differs from the one-shot edit"
    result = json.loads((out / "result.json").read_text())
    assert result["reconstruction_error"] == one_shot["result"]["reconstruction_error"]
    assert result["counts"] == one_shot["result"]["counts"]
    assert result["provenance"]["source_image"]["sha256"] == one_shot["result"]["provenance"]["source_image"]["sha256"]
    assert [i["mean_abs_diff"] for i in result["items"]] == [i["mean_abs_diff"] for i in one_shot["result"]["items"]]


def test_info_describes_the_model(tiny_model_dir):
    proc = ok(run_cli("info", "--model", tiny_model_dir))
    info = json.loads(proc.stdout)
    assert info["image_size"] == 128
    assert info["latent_size"] == 16
    assert info["text_width"] == 32
    assert info["backend"]["backend"] == "torch"
    assert info["provenance"]["format"] == "diffusers"


# -- bad input -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad(diffusers_model_dir, images, tmp_path_factory) -> dict:
    """Bad inputs of every kind, and the good arguments they are mixed into."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("bad")
    (folder / "x.png").write_text("this is a text file, not a PNG\n")
    (folder / "empty-model").mkdir()
    (folder / "png-model").mkdir()
    (folder / "png-model" / "cxr.png").write_bytes(images["png8"].read_bytes())
    save_file({"bogus.weight": torch.zeros(2, 2)}, str(folder / "bogus-unet.safetensors"))
    torch.save({"conv_in.weight": torch.zeros(2, 2)}, folder / "unet-weights.bin")
    (folder / "not-an-inversion.npz").write_text("not a zip archive\n")
    (folder / "existing-file").write_text("keep me\n")
    return dict(folder=folder, model=diffusers_model_dir, image=images["png8"])


def _good(b: dict, **override) -> dict:
    args = {"--model": b["model"], "--image": b["image"], "--prompt": SOURCE, "--target": TARGET,
            "--inversion": "direct", "--steps": STEPS, "--self-replace": "0.5"}
    args.update(override)
    return args


LONG_TARGET = "Chest X-ray showing " + " ".join(["large"] * 80) + " Pleural Effusion"

# id: (arguments given the fixture `bad`, what the error line must mention)
BAD_CASES = {
    "missing-image": (lambda b: _good(b, **{"--image": b["folder"] / "no-such-image.png"}), ["no-such-image.png"]),
    "text-file-named-png": (lambda b: _good(b, **{"--image": b["folder"] / "x.png"}), ["x.png", "not a readable image"]),
    "empty-prompt": (lambda b: _good(b, **{"--prompt": ""}), ["prompt", "empty"]),
    "whitespace-prompt": (lambda b: _good(b, **{"--prompt": "   \t "}), ["prompt", "empty"]),
    "target-over-77-tokens": (lambda b: _good(b, **{"--target": LONG_TARGET}), ["Chest X-ray showing large", "77"]),
    "model-empty-dir": (lambda b: _good(b, **{"--model": b["folder"] / "empty-model"}), ["empty-model", "not a model"]),
    "model-dir-with-png": (lambda b: _good(b, **{"--model": b["folder"] / "png-model"}), ["png-model", "not a model"]),
    "unet-weights-wrong-keys": (lambda b: _good(b, **{"--unet-weights": b["folder"] / "bogus-unet.safetensors"}),
                                ["bogus-unet.safetensors", "missing keys", "unexpected keys: bogus.weight"]),
    "unet-weights-pickle": (lambda b: _good(b, **{"--unet-weights": b["folder"] / "unet-weights.bin"}),
                            ["unet-weights.bin", "pickle", "--allow-pickle"]),
    "inversion-file-not-npz": (lambda b: {"--model": b["model"], "--target": TARGET,
                                          "--inversion-file": b["folder"] / "not-an-inversion.npz"},
                               ["not-an-inversion.npz"]),
    "self-replace-out-of-range": (lambda b: _good(b, **{"--self-replace": "0.4,1.5"}), ["self_replace", "1.5"]),
}


# Bad settings, checked before any model work.
BUG_CASES = {
    "duplicate-self-replace-names": (lambda b: _good(b, **{"--self-replace": "0.4,0.4"}), ["self_replace", "0.4"]),
    "steps-zero": (lambda b: _good(b, **{"--steps": 0}), ["steps", "0"]),
    "guidance-below-one": (lambda b: _good(b, **{"--guidance": 0.5}), ["guidance", "0.5"]),
    "out-below-a-file": (lambda b: dict(_good(b), out=b["folder"] / "existing-file" / "out"), ["existing-file"]),
}


def _argv(args: dict, out: Path) -> list:
    argv = ["edit", "--no-progress", "--out", out]
    for key, value in args.items():
        argv += [key, value]
    return argv


@pytest.fixture(scope="module")
def bad_runs(bad, tmp_path_factory) -> dict:
    """Every bad-input case run once (two at a time), each with a fresh --out path."""
    runs = {}
    for case, (make_args, mentions) in {**BAD_CASES, **BUG_CASES}.items():
        args = make_args(bad)
        out = Path(args.pop("out")) if "out" in args else tmp_path_factory.mktemp(f"bad-{case}") / "out"
        runs[case] = dict(argv=_argv(args, out), out=out, mentions=mentions)
    runs["out-is-a-file"] = dict(argv=_argv(_good(bad), bad["folder"] / "existing-file"),
                                 out=bad["folder"] / "existing-file", mentions=["existing-file", "not a folder"])
    for run, proc in zip(runs.values(), run_many([r["argv"] for r in runs.values()])):
        run["proc"] = proc
    return runs


def check_clean_failure(proc: subprocess.CompletedProcess, mentions) -> str:
    assert proc.returncode not in (0, EXIT_INTERNAL), _show(proc)
    assert "Traceback" not in proc.stderr, _show(proc)
    assert "internal error" not in proc.stderr, _show(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, _show(proc)
    for text in mentions:
        assert text.lower() in errors[0].lower(), f"{text!r} not in {errors[0]!r}"
    return errors[0]


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_cleanly(bad_runs, case):
    run = bad_runs[case]
    check_clean_failure(run["proc"], run["mentions"])
    assert not run["out"].exists(), f"--out {run['out']} was created by a failed run"
    assert not list(run["out"].parent.glob(".out.*")), "staging folder left behind"


def test_out_pointing_to_a_file_fails_cleanly(bad_runs):
    run = bad_runs["out-is-a-file"]
    check_clean_failure(run["proc"], run["mentions"])
    assert run["out"].read_text() == "keep me\n"


@pytest.mark.parametrize("case", list(BUG_CASES))
def test_bad_settings_fail_cleanly(bad_runs, case):
    run = bad_runs[case]
    proc = run["proc"]
    assert proc.returncode not in (0, EXIT_INTERNAL), _show(proc)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, _show(proc)
    # an `error:` line of ours, or argparse's `prism-rt edit: error: …`
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors and all(text.lower() in errors[-1].lower() for text in run["mentions"]), _show(proc)
