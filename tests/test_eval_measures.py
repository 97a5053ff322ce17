"""Sharper measurement: per-window NLLs, the paired perplexity ratio, KL divergence and top-1
agreement against the float model, several evaluation texts, on the real stories260K model."""
from __future__ import annotations

import json
import math

import pytest

from layerquant.cli import main
from layerquant.config import RunConfig, text_name
from layerquant.errors import InvalidSpec
from layerquant.report import evaluation_markdown
from layerquant.solvers.evaluation import paired_ratio, t_quantile
from layerquant.tasks.context import RunContext
from layerquant.tasks.validation import compare_models, eval_windows, model_perplexity


def test_paired_ratio_is_the_perplexity_ratio_with_a_t_interval_over_window_differences():
    tokens = [255] * 5
    a = [400.0, 380.0, 420.0, 390.0, 410.0]
    b = [404.0, 381.0, 426.0, 392.0, 413.0]
    paired = paired_ratio(a, b, tokens)
    assert paired["ratio"] == pytest.approx(math.exp((sum(b) - sum(a)) / sum(tokens)), rel=1e-12)
    # equal window lengths: the plain t interval of the per-window mean differences
    means = [(y - x) / n for x, y, n in zip(a, b, tokens)]
    mean = sum(means) / 5
    std_err = math.sqrt(sum((m - mean) ** 2 for m in means) / 4 / 5)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-5)
    assert paired["low"] == pytest.approx(math.exp(mean - 2.776445 * std_err), rel=1e-6)
    assert paired["high"] == pytest.approx(math.exp(mean + 2.776445 * std_err), rel=1e-6)
    assert paired["low"] > 1  # every window got worse: the interval excludes 1
    # a difference that flips sign across windows is not decided
    mixed = paired_ratio(a, [x + d for x, d in zip(a, [3.0, -2.0, 1.0, -3.0, 2.0])], tokens)
    assert mixed["low"] < 1 < mixed["high"]


def test_a_model_against_itself_has_ratio_exactly_one_no_divergence_and_full_agreement(stories_model, tmp_path):
    ctx = RunContext.open(RunConfig(eval_windows=4, store=str(tmp_path / "store")).model_dump())
    windows = eval_windows(ctx)
    result = compare_models(ctx.reader, ctx.reader, windows)
    assert (result["paired"]["low"], result["paired"]["ratio"], result["paired"]["high"]) == (1.0, 1.0, 1.0)
    assert result["kl_mean"] == 0.0 and result["kl_p99"] == 0.0
    assert result["top1_agreement"] == 1.0
    # and the side-by-side pass measures what the plain streamed pass does
    alone = model_perplexity(ctx, windows, None)
    assert result["ppl"] == alone["ppl"] == result["reference"]["ppl"]
    assert len(alone["window_nll"]) == 4 and alone["window_tokens"] == [windows.shape[1] - 1] * 4
    assert sum(alone["window_nll"]) / sum(alone["window_tokens"]) == pytest.approx(alone["nll"], rel=1e-12)


@pytest.fixture(scope="module")
def bf16_rounded_model(stories_model, tmp_path_factory):
    """stories260K with every block weight rounded to bfloat16: a real model close to the float
    one but not equal to it (what a comparison against the float baseline is for)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("bf16") / "stories260K-bf16"
    shutil.copytree(stories_model, folder)
    tensors = load_file(Path(stories_model) / "model.safetensors")
    save_file({name: t.bfloat16().float() if name.startswith("model.layers.") else t for name, t in tensors.items()},
              folder / "model.safetensors")
    return str(folder)


def run_eval(capsys, *argv: str) -> dict:
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_baselines_pass_is_stored_and_a_second_comparison_runs_none_of_its_blocks(stories_model, bf16_rounded_model, eval_text,
                                                                                      tmp_path, capsys):
    from layerquant.infra.store import open_store

    store = str(tmp_path / "store")
    common = ["--baseline", stories_model, "--text", eval_text, "--windows", "6", "--store", store]
    first = run_eval(capsys, "--model", bf16_rounded_model, *common)
    assert first["baseline_pass"]["blocks_run"] == 5 and not first["baseline_pass"]["from_store"]
    assert len([p for p in open_store(store).list_paths("cas/eval-hidden") if p.endswith(".safetensors")]) == 1
    second = run_eval(capsys, "--model", bf16_rounded_model, *common)
    assert second["baseline_pass"] == second["baseline_pass"] | {"blocks_run": 0, "from_store": True}
    # everything measured is the same, bit for bit (JSON floats round-trip exactly)
    strip = lambda result: {k: v for k, v in result.items() if k != "baseline_pass"}  # noqa: E731
    assert strip(second) == strip(first)
    assert 0 < first["kl_mean"] and first["top1_agreement"] < 1 and len(first["window_nll"]) == 6
    # the stored pass belongs to the baseline, not to the model measured against it
    itself = run_eval(capsys, "--model", stories_model, *common)
    assert itself["baseline_pass"]["blocks_run"] == 0
    assert itself["kl_mean"] == 0.0 and itself["top1_agreement"] == 1.0 and itself["ppl"] == first["reference"]["ppl"]
    # other windows are another pass
    fewer = run_eval(capsys, "--model", bf16_rounded_model, *common[:-4], "--windows", "4", "--store", store)
    assert fewer["baseline_pass"]["blocks_run"] == 5
    assert fewer["window_nll"] == first["window_nll"][:4]


def test_eval_texts_are_a_list_keyed_by_name_and_one_text_keeps_the_run_id(eval_text, calib_text):
    single = RunConfig(eval=eval_text)
    assert RunConfig(eval=[eval_text]).run_id() == single.run_id() == RunConfig().run_id()
    both = RunConfig(eval=[eval_text, calib_text])
    assert both.eval_names() == [text_name(eval_text), text_name(calib_text)] == ["tinystories_eval_600k", "tinystories_calib_190k"]
    assert both.run_id() != single.run_id()
    with pytest.raises(InvalidSpec, match="share the name"):
        RunConfig.from_sources(None, eval=[eval_text, eval_text])
    with pytest.raises(InvalidSpec, match="empty"):
        RunConfig.from_sources(None, eval=[])


@pytest.fixture(scope="module")
def gptq_runs(tmp_path_factory, eval_text, calib_text, prefect_server):
    """stories260K GPTQ at 4, 3 and 2 bits (group 32) in one store, evaluated on two texts; the
    4-bit run is packed as compressed-tensors."""
    from layerquant.flows.quantize import quantize_flow

    root = tmp_path_factory.mktemp("gptq-kl")
    reports = {}
    for bits in (4, 3, 2):
        config = RunConfig(bits=bits, group_size=32, method="gptq", nsamples=32, calib_selection="first", eval_windows=16,
                           eval=[eval_text, calib_text], store=str(root / "store"),
                           out=str(root / f"w{bits}"), pack_format="compressed-tensors" if bits == 4 else "dequantized")
        reports[bits] = quantize_flow(config.model_dump())
    return root, reports


@pytest.mark.slow
def test_kl_grows_and_top1_agreement_falls_from_4_to_3_to_2_bit_gptq(gptq_runs):
    _, reports = gptq_runs
    kl = {bits: report["kl_mean"] for bits, report in reports.items()}
    top1 = {bits: report["top1_agreement"] for bits, report in reports.items()}
    assert 0 < kl[4] < kl[3] < kl[2]
    assert 1 > top1[4] > top1[3] > top1[2] > 0.1
    for report in reports.values():
        assert report["kl_p99"] > report["kl_mean"]
        low, high = report["ppl_ratio_ci95"]
        assert report["ppl_ratio"] == pytest.approx(report["ppl_quant"] / report["ppl_fp"], rel=1e-9)
        assert low < report["ppl_ratio"] < high
    # 2 bits is worse than float beyond doubt
    assert reports[2]["ppl_ratio_ci95"][0] > 1


@pytest.mark.slow
def test_every_evaluation_text_is_reported_under_its_name_and_the_first_is_the_headline(gptq_runs):
    root, reports = gptq_runs
    report = json.loads((root / "w3" / "report.json").read_text())
    assert list(report["evaluations"]) == ["tinystories_eval_600k", "tinystories_calib_190k"]
    headline = report["evaluations"]["tinystories_eval_600k"]
    assert (headline["ppl_fp"], headline["ppl_quant"], headline["kl_mean"]) == (report["ppl_fp"], report["ppl_quant"], report["kl_mean"])
    other = report["evaluations"]["tinystories_calib_190k"]
    assert other["ppl_fp"] != headline["ppl_fp"] and 0 < other["kl_mean"]
    assert len(other["window_nll_quant"]) == len(other["window_nll_fp"]) == 16
    # the Prefect summary has one row per text
    table = evaluation_markdown(report)
    assert "| tinystories_eval_600k |" in table and "| tinystories_calib_190k |" in table
    assert f"{headline['kl_mean']:.5f}" in table


@pytest.mark.slow
def test_eval_with_a_baseline_reports_what_the_run_measured(gptq_runs, stories_model, eval_text, capsys):
    root, reports = gptq_runs
    assert main(["eval", "--model", str(root / "w4"), "--baseline", stories_model, "--text", eval_text, "--windows", "16",
                 "--store", str(root / "eval-store")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = reports[4]
    # the packed compressed-tensors folder, read back, is the model the run evaluated
    assert result["ppl"] == pytest.approx(report["ppl_quant"], rel=1e-5)
    assert result["reference"]["ppl"] == pytest.approx(report["ppl_fp"], rel=1e-9)
    assert result["kl_mean"] == pytest.approx(report["kl_mean"], rel=1e-3)
    assert result["top1_agreement"] == pytest.approx(report["top1_agreement"], abs=2 / result["tokens"])
    assert result["paired"]["low"] < result["paired"]["ratio"] < result["paired"]["high"]


@pytest.mark.slow
def test_eval_baseline_takes_the_float_pass_a_quantize_run_stored(gptq_runs, stories_model, eval_text, capsys):
    root, reports = gptq_runs
    # the runs' own store: their float evaluation of stories260K on these 16 windows is there
    result = run_eval(capsys, "--model", str(root / "w3"), "--baseline", stories_model, "--text", eval_text, "--windows", "16",
                      "--store", str(root / "store"))
    assert result["baseline_pass"]["blocks_run"] == 0 and result["baseline_pass"]["from_store"]
    first_text = reports[3]["evaluations"]["tinystories_eval_600k"]
    assert result["reference"]["window_nll"] == first_text["window_nll_fp"]
    assert result["kl_mean"] == pytest.approx(reports[3]["kl_mean"], rel=1e-6)


def test_eval_flag_repeats_and_a_recipe_takes_a_list(tmp_path, eval_text, calib_text):
    from layerquant.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "--out", str(tmp_path / "out"), "--eval", eval_text, "--eval", calib_text])
    assert config_from_args(args).eval_texts() == [eval_text, calib_text]
    once = build_parser().parse_args(["quantize", "--out", str(tmp_path / "out"), "--eval", eval_text])
    assert config_from_args(once).eval == eval_text  # one text: the single-path setting it always was
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"eval:\n  - {eval_text}\n  - {calib_text}\n")
    assert RunConfig.from_sources(str(recipe)).eval_names() == ["tinystories_eval_600k", "tinystories_calib_190k"]
