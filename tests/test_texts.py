"""Text sources as llm-compressor's examples use them: json:FILE, text:FILE, a hub dataset from
the local datasets cache (offline) with :config:split and --text-column, chat messages rendered
with the tokenizer's chat template."""
from __future__ import annotations

import json
import shutil

import pytest

from layerquant.cli import main
from layerquant.errors import CalibrationError
from layerquant.infra.texts import read_text

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def stories(calib_text) -> list[str]:
    return [s for s in read_text(calib_text).split("\n\n") if s.strip()][:400]


def chat_rows(stories: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": story}] for story in stories]


def one_error_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_json_and_text_files_through_datasets(tmp_path, stories):
    rows = tmp_path / "stories.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "story": s}) + "\n" for i, s in enumerate(stories)))
    assert read_text(f"json:{rows}", text_column="story") == "\n\n".join(stories)
    with pytest.raises(CalibrationError, match=r"no 'text' column.*\['id', 'story'\].*--text-column"):
        read_text(f"json:{rows}")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(s.replace("\n", " ") for s in stories))
    assert read_text(f"text:{lines}") == "\n\n".join(s.replace("\n", " ") for s in stories)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_text(f"json:{tmp_path / 'missing.jsonl'}")


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch, stories):
    """What `load_dataset("tiny-org/stories", "chat")` leaves in HF_HOME/datasets once online:
    prepared Arrow files under tiny-org___stories/chat/0.0.0/<commit>."""
    from datasets.packaged_modules.json.json import Json

    home = tmp_path / "hf-home"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"story": s, "messages": m}) + "\n" for s, m in zip(stories, chat_rows(stories))))
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="stories", config_name="chat", config_id="chat", hash="c" * 40,
                   data_files={"validation": str(rows)})
    builder.download_and_prepare()
    (home / "datasets").mkdir(parents=True)
    shutil.move(tmp_path / "build" / "stories", home / "datasets" / "tiny-org___stories")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    return home


def test_a_hub_dataset_from_the_cache_offline(capsys, tmp_path, datasets_cache, stories, stories_model):
    capsys.readouterr()  # the fixture's own output
    assert read_text("tiny-org/stories:chat:validation", text_column="story") == "\n\n".join(stories)
    # eval through the spec gives the perplexity of the same text as a file
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n".join(stories))
    common = ["--model", stories_model, "--windows", "4", "--seqlen", "256"]
    assert main(["eval", "--text", str(plain), *common]) == 0
    from_file = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--text", "tiny-org/stories:chat:validation", "--text-column", "story", *common]) == 0
    from_hub = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_hub["ppl"] == from_file["ppl"]
    with pytest.raises(CalibrationError, match="Unknown split"):
        read_text("tiny-org/stories:chat:train", text_column="story")
    capsys.readouterr()
    code = main(["eval", "--text", "tiny-org/not-cached::train", *common])
    one_error_line(capsys, code, "tiny-org/not-cached", "not in the local datasets cache", "load it once")


def test_chat_messages_need_a_chat_template(capsys, tmp_path, datasets_cache, stories, stories_model):
    from layerquant.infra.texts import load_tokenizer

    capsys.readouterr()  # the fixture's own output
    # the bundled tokenizer has no chat template: one clear line before any work
    code = main(["quantize", "--calib", "tiny-org/stories:chat:validation", "--nsamples", "16", "--eval-windows", "4",
                 "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")])
    one_error_line(capsys, code, "chat messages", "no chat template", "--text-column")
    assert not (tmp_path / "store" / "cas").exists()
    # a copy of the model whose tokenizer has one: the `messages` column (taken when there is
    # no `text` column) is rendered turn by turn
    model = tmp_path / "chat-model"
    shutil.copytree(stories_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    text = read_text("tiny-org/stories:chat:validation", tokenizer=load_tokenizer(model))
    assert text.startswith(f"<|user|> Tell me a story.\n<|assistant|> {stories[0]}\n")
    assert text.count("<|assistant|>") == len(stories)
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--text", "tiny-org/stories:chat:validation", "--windows", "4", "--seqlen", "256"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] > 1
