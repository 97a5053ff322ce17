"""`--model org/name` through huggingface_hub's cache, offline: a hub-cache layout built from the
bundled stories260K (blobs, snapshot symlinks, refs) in a temporary HF_HOME."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from layerquant.cli import main
from layerquant.errors import InvalidModel
from layerquant.infra.hub import resolve_model

MAIN = "a" * 40
V2 = "b" * 40


def add_snapshot(repo: Path, commit: str, source: Path, ref: str | None) -> Path:
    """What `hf download` leaves: content-addressed blobs, a snapshot of symlinks to them, a ref."""
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, stories_model):
    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--tiny-org--stories260K"
    add_snapshot(repo, MAIN, Path(stories_model), "main")
    add_snapshot(repo, V2, Path(stories_model), "v2")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_a_hub_id_resolves_to_its_cached_snapshot_and_revision(hub_cache):
    assert Path(resolve_model("tiny-org/stories260K")) == hub_cache / "snapshots" / MAIN
    assert Path(resolve_model("tiny-org/stories260K", "v2")) == hub_cache / "snapshots" / V2
    assert Path(resolve_model("tiny-org/stories260K", MAIN)) == hub_cache / "snapshots" / MAIN
    with pytest.raises(InvalidModel, match="--revision"):
        resolve_model(str(hub_cache), "v2")  # a local folder has no revisions


def test_eval_through_a_hub_id_equals_eval_of_the_folder(capsys, hub_cache, stories_model, eval_text):
    common = ["--text", eval_text, "--windows", "4", "--seqlen", "256"]
    assert main(["eval", "--model", stories_model, *common]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", "tiny-org/stories260K", "--revision", "v2", *common]) == 0
    hub = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert hub["ppl"] == local["ppl"]


@pytest.mark.parametrize("model,revision,needles", [
    ("tiny-org/not-there", None, ["tiny-org/not-there", "HF_HUB_OFFLINE=1", "hf download tiny-org/not-there"]),
    ("tiny-org/stories260K", "v9", ["at revision v9", "--revision v9"]),
])
def test_a_model_missing_offline_is_one_line_that_says_what_to_do(capsys, tmp_path, hub_cache, model, revision, needles):
    args = ["quantize", "--model", model, "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")]
    code = main(args + (["--revision", revision] if revision else []))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("prefect_server")
def test_quantize_a_hub_model_offline(capsys, tmp_path, hub_cache):
    out = tmp_path / "out"
    code = main(["quantize", "--model", "tiny-org/stories260K", "--method", "rtn", "--eval-windows", "4", "--out", str(out),
                 "--store", str(tmp_path / "store")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert Path(report["model"]) == hub_cache / "snapshots" / MAIN
    assert report["ppl_quant"] < 1.2 * report["ppl_fp"]
    # the default output is the compressed-tensors checkpoint, and `layerquant eval` reads it back
    # with the perplexity the run reported
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--text", report_text(), "--windows", "4", "--seqlen", "256"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] == pytest.approx(report["ppl_quant"], rel=1e-6)


def report_text() -> str:
    from layerquant.config import default_eval

    return default_eval()
