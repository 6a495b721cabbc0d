"""The CLI as a new user meets it: an engine folder picks its own backend and inversion; bad
settings are refused at once, on one `error:` line, before any model loads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prism_rt.cli import main

ENGINE = Path(__file__).resolve().parent.parent / "engines" / "phantom-demo"
SOURCE = "Chest X-ray showing No Finding, Support Devices"
TARGET = "Chest X-ray showing No Finding"


def _args(tmp_path, *extra):
    return ["edit", "--model", str(ENGINE), "--image", str(ENGINE / "images" / "phantom-1000003.png"),
            "--prompt", SOURCE, "--target", TARGET, "--out", str(tmp_path / "out"), "--no-progress", *extra]


@pytest.mark.parametrize("flag, value", [
    ("--guidance", "1e30"), ("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "0.5"),
    ("--edit-weight", "1e30"), ("--edit-weight", "-3"), ("--edit-weight", "nan"),
    ("--blend-threshold", "nan"), ("--blend-threshold", "0"), ("--blend-threshold", "inf"),
    ("--blend-dilation", "-1"), ("--blend-dilation", "9"),
    ("--noise-blend-threshold", "nan"), ("--noise-blend-threshold", "inf"), ("--noise-blend-threshold", "-1"),
    ("--cross-replace", "nan"), ("--self-replace", "1.5"), ("--steps", "0"), ("--max-batch", "0"),
    ("--threads", "0"), ("--composite", "nan"), ("--edit-negative", "none"),
])
def test_values_that_cannot_be_right_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, flag, value):
    import prism_rt.engine

    def no_load(*args, **kwargs):  # the refusal must come before this
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(prism_rt.engine.Engine, "load", no_load)
    code = _exit_code(_args(tmp_path, flag, value))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def _exit_code(argv) -> int:
    """main's return code, or argparse's exit code (parse errors exit from inside the parser)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_argparse_errors_are_one_line_naming_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prism_rt.cli", *_args(tmp_path, "--guidance", "lots")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "--guidance" in proc.stderr
    assert "--help" in proc.stderr


def test_empty_out_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["edit", "--model", str(ENGINE), "--image", "x.png", "--prompt", SOURCE, "--target", TARGET, "--out", ""])
    assert caught.value.code == 2 and "empty" in capsys.readouterr().err


def test_an_engine_folder_runs_with_no_backend_or_inversion_flag(tmp_path, capsys):
    code = main(_args(tmp_path, "--steps", "4", "--self-replace", "0.5", "--threads", "1"))
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["inversion"]["method"] == "direct"
    assert result["provenance"]["backend"]["backend"] == "onnxruntime"
    assert result["settings"]["backend"] == "onnxruntime"
    assert result["reconstruction_error"] <= 1e-4  # direct inversion pins the source: exact
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"edit-1-s0.50.png", "result.json", "figure.png"}


def test_source_negative_on_ddim_is_refused_before_the_inversion(tmp_path, capsys, monkeypatch):
    import prism_rt.engine

    def no_inversion(*args, **kwargs):  # the refusal must come before this
        raise AssertionError("the image was inverted before the settings were checked")

    monkeypatch.setattr(prism_rt.engine.Engine, "invert", no_inversion)
    code = _exit_code(_args(tmp_path, "--inversion", "ddim", "--edit-negative", "source"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "needs direct or negative-prompt" in err, err
    assert not (tmp_path / "out").exists()


def test_null_text_on_an_engine_folder_is_refused_before_work(tmp_path, capsys):
    code = main(_args(tmp_path, "--inversion", "null-text"))
    err = capsys.readouterr().err
    assert code == 2 and "null-text inversion needs gradients" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_info_prints_a_summary_not_the_manifest(capsys):
    assert main(["info", str(ENGINE)]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 20 and "int8-cpu" in text and "PSNR" in text
    assert main(["info", str(ENGINE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precisions"] == ["fp32", "int8-cpu"]


def test_progress_goes_to_a_log_as_lines():
    import io

    from prism_rt.progress import Progress

    log = io.StringIO()
    bar = Progress(True, 50, "edit", stream=log)
    for _ in range(50):
        bar.update_one()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("edit: 5/50 steps") and lines[-1].startswith("edit: 50/50 steps")
    quiet = io.StringIO()
    bar = Progress(False, 50, "edit", stream=quiet)
    bar.update_one()
    assert quiet.getvalue() == ""


def test_a_manifest_with_an_impossible_schedule_is_a_typed_error(tmp_path, capsys):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(ENGINE, engine, ignore=shutil.ignore_patterns("images", "classifier.onnx", "onnx-int8-cpu"))
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["model"]["scheduler_config"]["num_train_timesteps"] = 0
    manifest.pop("variants", None)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    image = ENGINE / "images" / "phantom-1000003.png"
    code = main(["edit", "--model", str(engine), "--image", str(image), "--prompt", SOURCE, "--target", TARGET,
                 "--out", str(tmp_path / "out"), "--no-progress", "--steps", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "noise schedule" in err and "num_train_timesteps" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_edit_loads_no_benchmark_code():
    """Commands added by entry point (bench, evaluate) are loaded only when asked for."""
    code = ("import sys\nfrom prism_rt.cli import build_parser\nbuild_parser('edit')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('prism_bench', 'prism_export'))}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
    code = code.replace("build_parser('edit')", "build_parser('bench')")
    assert "prism_bench" in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
