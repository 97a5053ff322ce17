"""Bad input: one clear line, a non-zero exit, and no output folder left behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerquant.cli import main


@pytest.fixture
def broken_model(tmp_path, stories_model):
    folder = tmp_path / "model"
    shutil.copytree(stories_model, folder)
    return folder


def assert_quantize_fails_cleanly(capsys, tmp_path: Path, args: list[str], *needles: str) -> None:
    """`layerquant quantize ARGS --out DIR` exits non-zero with one `error:` line holding every
    needle, and leaves neither DIR nor a partial sibling of it behind."""
    out = tmp_path / "out"
    code = main(["quantize", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial*"))


def test_missing_model_folder(capsys, tmp_path):
    assert_quantize_fails_cleanly(capsys, tmp_path, ["--model", str(tmp_path / "nope")], "does not exist", "--model")


def test_corrupt_safetensors(capsys, tmp_path, broken_model):
    weights = broken_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    assert_quantize_fails_cleanly(capsys, tmp_path, ["--model", str(broken_model)], "truncated or corrupt", "re-download")


def test_garbage_safetensors(capsys, tmp_path, broken_model):
    (broken_model / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_quantize_fails_cleanly(capsys, tmp_path, ["--model", str(broken_model)], "model.safetensors")


def test_unsupported_architecture(capsys, tmp_path, broken_model):
    config = json.loads((broken_model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (broken_model / "config.json").write_text(json.dumps(config))
    assert_quantize_fails_cleanly(capsys, tmp_path, ["--model", str(broken_model)], "gpt2", "llama", "qwen3", "gemma3_text")


def test_empty_calibration_text(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert_quantize_fails_cleanly(capsys, tmp_path, ["--calib", str(empty)], "empty")


def test_too_short_calibration_text(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a little dog. " * 20)
    assert_quantize_fails_cleanly(capsys, tmp_path, ["--calib", str(short), "--nsamples", "16"], "16 requested", "lower the number of samples")


@pytest.mark.parametrize("flag,value,needle", [("--bits", "5", "bits"), ("--bits", "1", "bits"), ("--group-size", "3", "group_size"),
                                               ("--group-size", "-8", "group_size"), ("--nsamples", "0", "nsamples")])
def test_out_of_range_settings(capsys, tmp_path, flag, value, needle):
    assert_quantize_fails_cleanly(capsys, tmp_path, [flag, value], needle)


def test_bad_recipe(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("bits: 4\ngroup_sise: 32\n")
    assert_quantize_fails_cleanly(capsys, tmp_path, ["--recipe", str(recipe)], "group_sise")


def test_console_command_exits_non_zero_with_one_line(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "layerquant.cli", "quantize", "--model", str(tmp_path / "missing"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error:")
    assert not out.exists()
