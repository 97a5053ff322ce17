"""CLI pieces that need no Prefect server: eval, and calibration text from a datasets folder."""
from __future__ import annotations

import json

import pytest

from layerquant.cli import main
from layerquant.infra.texts import read_text


def test_eval_prints_the_float_perplexity_as_json(capsys, stories_model, eval_text):
    assert main(["eval", "--model", stories_model, "--text", eval_text, "--windows", "200", "--seqlen", "256"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ppl"] == pytest.approx(4.5737, abs=1e-3)  # the llm-compressor reference's float figure
    assert result["tokens"] == 200 * 255


def test_calibration_text_from_a_datasets_folder(tmp_path, calib_text):
    from datasets import Dataset

    stories = read_text(calib_text).split("\n\n")[:50]
    Dataset.from_dict({"text": stories}).save_to_disk(str(tmp_path / "ds"))
    assert read_text(tmp_path / "ds") == "\n\n".join(s for s in stories if s)
