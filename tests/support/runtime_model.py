"""A whole stories260K run with activation / KV quantization and rotation, without Prefect: the
solver calls a run makes (calibration embedding, block-by-block GPTQ with the run-time hooks,
streamed evaluation), composed in one function so the tests and bench/bisup.py measure the same
thing the pipeline does."""
from __future__ import annotations

from pathlib import Path

import torch

from layerquant.infra.checkpoint import CheckpointReader
from layerquant.infra.texts import load_tokenizer, read_text, tokenize
from layerquant.runtime_quant import RuntimeQuant
from layerquant.solvers.architectures import family_norm
from layerquant.solvers.reconstruct import reconstruct_block, stored_weight
from layerquant.solvers.runtime_model import RuntimeModel
from layerquant.solvers.windows import context_windows, make_windows, prompt_windows
from layerquant.specs import QuantSpec


def open_model(model_dir: str) -> tuple[CheckpointReader, object]:
    return CheckpointReader(model_dir), load_tokenizer(model_dir)


def text_windows(tokenizer, text_path: str, n: int, seq_len: int, selection: str = "first") -> torch.Tensor:
    return make_windows(tokenize(tokenizer, read_text(text_path)), n, seq_len, tokenizer.bos_token_id, selection, purpose="test")


def continuation_windows(tokenizer, text_path: str, n: int, prompt_tokens: int, continuation: int) -> torch.Tensor:
    """[n, prompt_tokens + continuation]: one shared prompt before n continuations (as the
    validation cuts them when prompt_kv_tokens is set)."""
    tokens = tokenize(tokenizer, read_text(text_path))
    return prompt_windows(tokens, n, prompt_tokens + continuation, prompt_tokens, tokenizer.bos_token_id, purpose="test")


def own_context_windows(tokenizer, text_path: str, n: int, prompt_tokens: int, continuation: int) -> torch.Tensor:
    """The continuations `continuation_windows` cuts, each after BOS and the text right before it
    (solvers.windows.context_windows: what --prompt-kv-eval own-context evaluates)."""
    tokens = tokenize(tokenizer, read_text(text_path))
    return context_windows(tokens, n, prompt_tokens + continuation, prompt_tokens, tokenizer.bos_token_id, purpose="test")


def next_norm(reader: CheckpointReader, model: RuntimeModel, index: int, tuning) -> torch.nn.Module | None:
    """The norm that reads block `index`'s output, as the block task passes it to tuning in the
    "next_norm" space (None otherwise)."""
    if tuning is None or not tuning.enabled or tuning.space != "next_norm":
        return None
    name = reader.arch.norm_reading_block_output(index, reader.n_blocks)
    return family_norm(reader.arch, reader.config, model.norm_weight(reader.tensor(name).float()))


def quantize_run(reader: CheckpointReader, model: RuntimeModel, calib: torch.Tensor | None, spec: QuantSpec | None,
                 tuning=None) -> list[dict[str, torch.Tensor]]:
    """Each block's weights as the run uses them: rotated (if so), then GPTQ/RTN-quantized
    block by block on the inputs the quantized earlier blocks produce, with activations and
    cache fake-quantized while calibrating, then `tuning` (a BlockTuning) with them in the loop.
    `spec` None keeps the weights float."""
    hidden = None if spec is None else model.embed(reader.embed_weight(), calib)
    out = []
    for index in range(reader.n_blocks):
        weights = model.block_weights(reader.block_weights(index))
        if spec is None:
            out.append(weights)
            continue
        specs = {name: spec for name in reader.arch.linear_names}
        result = reconstruct_block(reader.arch, reader.config, index, weights, hidden, specs, runtime=model.block_runtime(),
                                   tuning=tuning, next_norm=next_norm(reader, model, index, tuning))
        quantized = dict(weights)
        for outcome in result.outcomes:
            quantized[f"{outcome.name}.weight"] = stored_weight(outcome.tensors, outcome.spec)
        quantized.update(result.overrides)  # smoothed (or tuned) norms, as the stored artifact applies them
        out.append(quantized)
        hidden = result.outputs
    return out


def run_perplexity(reader: CheckpointReader, model: RuntimeModel, blocks: list[dict[str, torch.Tensor]], windows: torch.Tensor,
                   score_from: int = 0, float_prompt: bool = True) -> float:
    """With settings.prompt_kv_tokens, the shared prompt's cache is the float model's, as the
    validation runs it (`float_prompt` False: the quantized model's own prompt states, kept float)."""
    float_weights = (lambda i: model.block_weights(reader.block_weights(i))) if float_prompt else None
    return model.perplexity(windows, reader.n_blocks, lambda i: blocks[i], reader.embed_weight(), reader.final_norm_weight(),
                            reader.lm_head_weight(), score_from=score_from, float_block_weights=float_weights)["ppl"]


def plan(reader: CheckpointReader, settings: RuntimeQuant) -> RuntimeModel:
    return RuntimeModel.plan(reader.arch, reader.config, settings, tied_embeddings=not reader.has(reader.arch.lm_head_name))


def quantize_run_artifacts(reader: CheckpointReader, model: RuntimeModel, calib: torch.Tensor, spec: QuantSpec, tuning=None):
    """As `quantize_run`, but each block as the store keeps it: a BlockArtifact (codes, scales,
    low-rank factors, overrides and the layer records reports sum their bits from, built as
    tasks/blocks.py builds them). Returns (artifacts, blocks' weights as the run uses them)."""
    from layerquant.block_artifact import BlockArtifact, LayerRecord
    from layerquant.solvers.reconstruct import apply_block_artifact

    hidden = model.embed(reader.embed_weight(), calib)
    artifacts, weights_out = [], []
    for index in range(reader.n_blocks):
        weights = model.block_weights(reader.block_weights(index))
        specs = {name: spec for name in reader.arch.linear_names}
        result = reconstruct_block(reader.arch, reader.config, index, weights, hidden, specs, runtime=model.block_runtime(),
                                   tuning=tuning, next_norm=next_norm(reader, model, index, tuning))
        artifact = BlockArtifact([LayerRecord.measured(o.name, o.spec, o.shape, o.error, o.damp_used, o.seconds, o.tensors)
                                  for o in result.outcomes], {o.name: o.tensors for o in result.outcomes}, result.overrides)
        artifacts.append(artifact)
        weights_out.append(apply_block_artifact(weights, artifact))
        hidden = result.outputs
    return artifacts, weights_out


def write_packed(reader: CheckpointReader, artifacts, folder: Path, settings: RuntimeQuant, fmt: str = "compressed-tensors") -> dict:
    """The packed checkpoint tasks/pack.py writes, from the same format functions, in one
    safetensors file: returns its config.json."""
    import json

    from safetensors.torch import save_file

    from layerquant.kernels import formats

    folder.mkdir(parents=True, exist_ok=True)
    state, summaries, block_names = {}, [], set()
    for index, artifact in enumerate(artifacts):
        weights = reader.block_weights(index, dtype=None)
        prefix = reader.block_prefix(index)
        block_names.update(prefix + name for name in weights)
        packed = formats.pack_block(fmt, prefix, artifact, weights, {}, reader.dtype_of(reader.arch.embed_name), settings)
        state.update(packed.tensors)
        summaries.append(packed)
    state.update({name: reader.tensor(name).contiguous() for name in reader.weight_map if name not in block_names})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    files = formats.checkpoint_config_files(fmt, reader.config_dict, summaries, 0.01, settings)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2))
    return files["config.json"]
