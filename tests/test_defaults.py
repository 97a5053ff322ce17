"""One set of defaults: a solver called without options does what a run with no settings does,
and the CLI with no flags asks for exactly RunConfig's defaults."""
from __future__ import annotations

import dataclasses
import inspect

from layerquant.cli import build_parser, config_from_args
from layerquant.config import RunConfig
from layerquant.report import build_report
from layerquant.serving import vllm_servable
from layerquant.solvers import allocation
from layerquant.solvers.norm_tweak import tweak_norms
from layerquant.solvers.refine import refine_scales
from layerquant.specs import QuantSpec
from layerquant.tuning import BlockTuning

STEP_FIELDS = {"refine_steps", "norm_tweak_steps"}


def test_a_default_spec_is_a_default_run_spec():
    assert RunConfig().method == "gptq"
    assert QuantSpec() == RunConfig().default_spec()


def test_a_default_run_tunes_as_block_tuning_does():
    run = dataclasses.asdict(RunConfig().block_tuning())
    plain = dataclasses.asdict(BlockTuning())
    assert {k: v for k, v in run.items() if k not in STEP_FIELDS} == {k: v for k, v in plain.items() if k not in STEP_FIELDS}


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


def test_tuning_solvers_default_to_block_tuning():
    tuning = BlockTuning()
    norm_tweak = _defaults(tweak_norms)
    assert (norm_tweak["lr"], norm_tweak["loss"], norm_tweak["batch_size"], norm_tweak["seed"]) == (
        tuning.norm_tweak_lr, tuning.norm_tweak_loss, tuning.batch_size, tuning.seed)
    refine = _defaults(refine_scales)
    assert (refine["lr"], refine["batch_size"], refine["seed"]) == (tuning.refine_lr, tuning.batch_size, tuning.seed)


def test_cli_without_flags_is_run_config_defaults(tmp_path):
    args = build_parser().parse_args(["quantize", "--out", str(tmp_path / "out")])
    from_cli = config_from_args(args)
    where = {"store", "out"}  # the CLI makes locations absolute; they are not settings
    assert from_cli.model_dump(exclude=where) == RunConfig().model_dump(exclude=where)
    assert from_cli.run_id() == RunConfig().run_id()
    for command in (["retry", "--run", "x"], ["plan", "--run", "x", "--budget", "3"], ["pack", "--run", "x", "--format", "gptq", "--out", "o"]):
        assert build_parser().parse_args(command).store == RunConfig().store
    evaluate = build_parser().parse_args(["eval", "--model", "m", "--text", "t"])
    assert (evaluate.windows, evaluate.seqlen, evaluate.store) == (RunConfig().eval_windows, RunConfig().eval_seqlen, RunConfig().store)


def test_one_definition_of_vllm_servable():
    assert allocation.vllm_servable is vllm_servable
    specs = [QuantSpec(4, 128), QuantSpec(8, 0), QuantSpec(3, 128), QuantSpec(4, 256), QuantSpec(method="pbllm", salient_fraction=0.1)]
    layers = [{"name": f"l{i}", "spec": spec.to_dict(), "error": 0.0, "storage_bits": 1, "n_weights": 1, "damp": 0.01}
              for i, spec in enumerate(specs)]
    report = build_report([{"index": 0, "layers": layers, "output_error": 0.0, "seconds": 0.0}], ["b."],
                          {"ppl": 1.0, "windows": 1, "seqlen": 2}, {"ppl": 1.0}, {})
    assert report["vllm_unservable"] == [f"b.{layer['name']}" for layer, spec in zip(layers, specs) if not vllm_servable(spec)]
    assert report["vllm_unservable"] == ["b.l2", "b.l3", "b.l4"]
