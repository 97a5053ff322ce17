"""Below 4 bits through the flow, on real stories260K data: refinement and norm tweaking each
lower perplexity against the same run without them, at the same size; PB-LLM near 2 bits beats
the 2-bit GPTQ it was published against; quality gates redo blocks and fail runs."""
from __future__ import annotations

import math

import pytest

from layerquant.config import RunConfig
from layerquant.flows.quantize import quantize_flow
from layerquant.infra.store import LocalStore
from support.perplexity import transformers_perplexity

# whole quantization runs on stories260K: minutes each, so not in the fast tier
pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]

# the default recipe (4-bit group 128 GPTQ, 128 random calibration windows) with more eval windows
PROTOCOL = dict(eval_windows=100, eval_seqlen=256)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("tuning-store")


def quantize(store, **settings) -> dict:
    return quantize_flow(RunConfig(store=str(store), **PROTOCOL, **settings).model_dump())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_norm_tweaking_against_the_same_run_without_it(store, bits):
    """Norm tweaking pays at 2 bits; at 3 and 4 bits on this model there is little left for it to
    win since the signed full-range grid (3-bit g128 measured 2026-12-05: 6.508 plain, 6.544
    tweaked, +0.6%; it was -1% or better on the older grid), so there it must stay within noise."""
    plain = quantize(store, bits=bits)
    tweaked = quantize(store, bits=bits, norm_tweak_steps=100)
    assert tweaked["avg_bits"] == plain["avg_bits"]  # norms are overrides, not extra weights
    for block in tweaked["blocks"]:
        stats = block["tuning"]["norm_tweak"]
        assert stats["loss_after"] <= stats["loss_before"]
    if bits < 3:
        assert tweaked["ppl_quant"] < plain["ppl_quant"] * 0.99, (bits, plain["ppl_quant"], tweaked["ppl_quant"])
    else:
        # not worse than two standard errors of the eval NLL
        noise = math.exp(2 * plain["nll_std_err"])
        assert tweaked["ppl_quant"] <= plain["ppl_quant"] * noise, (plain["ppl_quant"], tweaked["ppl_quant"], noise)


@pytest.mark.parametrize("bits", [2, 3])
def test_refinement_lowers_perplexity_at_the_same_size(store, bits):
    plain = quantize(store, bits=bits)
    refined = quantize(store, bits=bits, refine_steps=100)
    assert refined["avg_bits"] == plain["avg_bits"]
    assert refined["ppl_quant"] < plain["ppl_quant"] * 0.97, (bits, plain["ppl_quant"], refined["ppl_quant"])


def test_refinement_in_the_next_norm_space_through_the_flow(store):
    """Every block tunes as the norm after it reads its output (the final norm after the last
    one): its own run and blocks, not the residual-space ones, and as good against plain GPTQ."""
    plain = quantize(store, bits=3)
    residual = quantize(store, bits=3, refine_steps=100, tuning_space="residual")
    in_next_norm_space = quantize(store, bits=3, refine_steps=100, tuning_space="next_norm")
    assert in_next_norm_space["run_id"] != residual["run_id"]
    # the default space ran in the earlier refinement test, so compare stored blocks, not cache hits
    manifests = LocalStore(store)
    stored = [{block["uri"] for block in manifests.read_manifest(run["run_id"])["blocks"]} for run in (residual, in_next_norm_space)]
    assert len(stored[1]) == in_next_norm_space["n_blocks"] and not stored[0] & stored[1]
    assert in_next_norm_space["ppl_quant"] < plain["ppl_quant"] * 0.97, (plain["ppl_quant"], in_next_norm_space["ppl_quant"])


def test_pbllm_near_two_bits_beats_plain_two_bit_gptq_of_larger_size(store):
    """PB-LLM's claim against the GPTQ it was published against (GPTQ's reference code: an
    asymmetric min-max grid, no clip search): 3% salient 8-bit weights, the rest binarized per
    row, every position, sign and scale counted (2.14 bits), beat 2-bit group-64 GPTQ (2.29
    bits). Measured 2026-12-05: 97.7 against 241.4. Our default GPTQ (signed full-range
    symmetric grid, clip search) beats both at this size: 72.0 at 2.26 bits."""
    partial = quantize(store, method="pbllm", salient_fraction=0.03, group_size=0)
    plain_gptq = quantize(store, bits=2, group_size=64, clip_search=False, sym=False)
    assert partial["avg_bits"] < 2.2 and partial["avg_bits"] < plain_gptq["avg_bits"], (partial["avg_bits"], plain_gptq["avg_bits"])
    assert partial["ppl_quant"] < 0.7 * plain_gptq["ppl_quant"], (partial["ppl_quant"], plain_gptq["ppl_quant"])


def test_tuned_blocks_are_stored_and_exported_as_measured(store, tmp_path, eval_text):
    out = tmp_path / "out"
    report = quantize(store, bits=3, refine_steps=100, norm_tweak_steps=100, out=str(out))
    assert len(report["blocks"]) == report["n_blocks"]
    assert all({"refine", "norm_tweak"} <= set(b["tuning"]) for b in report["blocks"])
    # what transformers loads (tweaked norms included) is what the report measured
    assert transformers_perplexity(out, eval_text, 100) == pytest.approx(report["ppl_quant"], rel=1e-4)
    # the same settings find every block in the store; other tuning settings do not
    again = quantize(store, bits=3, refine_steps=100, norm_tweak_steps=100)
    assert again["blocks_cached"] == list(range(report["n_blocks"]))
    other = quantize(store, bits=3, refine_steps=50, norm_tweak_steps=100)
    assert other["blocks_cached"] == []


def test_gate_without_a_plan_moves_the_block_to_a_finer_grid(store):
    plain = quantize(store, bits=3)
    errors = [block["output_error"] for block in plain["blocks"]]
    worst = max(range(len(errors)), key=errors.__getitem__)
    gated = quantize(store, bits=3, gate_output_error=errors[worst] * 0.999)
    event = next(event for event in gated["gates"] if event["block"] == worst)
    assert event["action"] == "redone" and event["output_error_after"] < errors[worst]
    bits = {layer["name"]: layer["bits"] for layer in gated["layers"]}
    assert all(bits[name] == 4 for name in bits if name.startswith(f"model.layers.{worst}."))
    assert all(bits[name] == 3 for name in bits if not name.startswith(f"model.layers.{worst}."))
    assert gated["ppl_quant"] < plain["ppl_quant"]


def test_max_ppl_increase_fails_the_run_with_one_line_and_no_output(store, tmp_path, capsys):
    from layerquant.cli import main

    out = tmp_path / "out"
    code = main(["quantize", "--bits", "2", "--eval-windows", "100", "--max-ppl-increase", "0.05", "--store", str(store), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("error: perplexity rose") and "max_ppl_increase 5%" in err[-1]
    assert not out.exists()
    manifest = LocalStore(store).read_manifest(RunConfig(bits=2, eval_windows=100, max_ppl_increase=0.05).run_id())
    assert manifest["status"] == "failed"  # with what was measured, for the person who reads it
    assert manifest["report"]["ppl_quant"] > manifest["report"]["ppl_fp"] * 1.05
