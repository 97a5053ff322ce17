"""A packed output is an ordinary model to lm-evaluation-harness: its `hf` model loads our
compressed-tensors folder and scores a local task as well as it scores the float model."""
from __future__ import annotations

import json
import re

import pytest

from layerquant.config import RunConfig

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

TASK = "tinystories_next_word"


def next_word_task(folder, text_path: str, count: int = 150) -> None:
    """A task YAML over a local JSON-lines file: TinyStories sentences without their last word,
    scored by whether the model's greedy continuation is that word (lm-eval's loglikelihood `acc`)."""
    text = open(text_path, encoding="utf-8").read()
    docs = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        words = sentence.rstrip(".!?").split()
        if len(words) >= 8 and words[-1].isalpha():
            docs.append({"context": " ".join(words[:-1]), "word": words[-1]})
        if len(docs) == count:
            break
    data = folder / "next_word.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: " {{word}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def lm_eval_accuracy(model_dir, task_dir) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"},
                              tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), batch_size=16)
    return results["results"][TASK]["acc,none"]


def test_lm_eval_scores_a_compressed_tensors_output_like_the_float_model(tmp_path, stories_model, eval_text):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (dev extra)")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (dev extra)")
    from layerquant.flows.quantize import quantize_flow

    out = tmp_path / "w4"
    config = RunConfig(bits=4, group_size=32, method="gptq", nsamples=32, calib_selection="first", eval_windows=4,
                       store=str(tmp_path / "store"), out=str(out), pack_format="compressed-tensors")
    quantize_flow(config.model_dump())
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    next_word_task(task_dir, eval_text)

    quantized = lm_eval_accuracy(out, task_dir)
    float_model = lm_eval_accuracy(stories_model, task_dir)
    assert 0.0 <= quantized <= 1.0 and 0.0 <= float_model <= 1.0
    # the float model gets a fair share of the last words right (random weights get ~0 of 512
    # tokens), and 4-bit GPTQ stays close to it: a folder loaded wrongly would not
    assert float_model > 0.2
    assert abs(quantized - float_model) <= 0.08
