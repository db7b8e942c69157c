"""Tiny random causal LMs for tests: configs, saved checkpoints and GGUF files, all offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

FAMILY_NAMES = ("llama", "mistral", "qwen2", "gemma3", "gpt2")


def tiny_config(
    family: str = "llama", num_layers: int = 2, hidden: int = 64, vocab: int = 128, **overrides
) -> PretrainedConfig:
    """A config of `family` small enough that a forward pass takes milliseconds."""
    if family == "gpt2":
        fields = dict(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=num_layers,
            n_head=4,
            n_positions=64,
            n_inner=2 * hidden,
        )
        fields.update(overrides)
        return GPT2Config(**fields)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    classes = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "gemma3": Gemma3TextConfig,
    }
    if family == "gemma3":
        common.update(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    common.update(overrides)
    return classes[family](**common)


def tiny_llama_config(num_layers: int = 4, hidden: int = 64, **overrides) -> LlamaConfig:
    return tiny_config("llama", num_layers=num_layers, hidden=hidden, **overrides)


def random_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A full random model (transformers' own init), vector params jittered, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param), alpha=0.02)
    return model.eval()


def save_tiny_model(config: PretrainedConfig, directory: Path, seed: int = 0) -> Path:
    """Save a random model as a transformers safetensors directory."""
    random_model(config, seed).save_pretrained(directory, safe_serialization=True)
    return directory


def rope_theta(config: PretrainedConfig) -> float:
    """The rotary base: `config.rope_theta` on transformers 4, `rope_parameters` on 5."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(config.rope_theta)


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_kv_head: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (the loader must undo it)."""
    if n_kv_head is not None and n_head != n_kv_head:
        n_head = n_kv_head
    shape = weights.shape
    return (
        weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


SPIECE_WORDS = ("great", "terrible", "movie", "film", "plot", "actor", "story", "scene", "boring", "fun")


def tiny_spm_vocab(words: tuple[str, ...] = SPIECE_WORDS) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-BPE vocabulary as a GGUF stores it: (pieces, scores, token types).

    Control tokens, 256 byte pieces, every character and every prefix of `▁word` for each
    word, so that each word is reached by merging left to right (a longer piece scores lower,
    i.e. is merged later, as SentencePiece's training order gives).
    """
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [3, 3, 3, 2]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces: list[str] = ["▁"]
    for word in words:
        for piece in ("▁" + word, word):
            pieces += [c for c in piece if c not in pieces]
            pieces += [piece[:n] for n in range(2, len(piece) + 1) if piece[:n] not in pieces]
    pieces = sorted(dict.fromkeys(pieces), key=len)
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    return tokens + pieces, scores, types + [1] * len(pieces)


def write_tiny_llama_gguf(
    model: PreTrainedModel, path: Path, quantize_blocks: bool = False,
    vocab: tuple[list[str], list[float], list[int]] | None = None,
) -> Path:
    """Write a Llama model as llama.cpp would: GGUF names, permuted q/k, optional Q8_0 blocks,
    and with `vocab` (tiny_spm_vocab) a SentencePiece tokenizer without prefix space."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    if vocab is not None:
        tokens, scores, types = vocab
        if len(tokens) != config.vocab_size:
            raise ValueError(f"the vocab has {len(tokens)} pieces, the model {config.vocab_size}")
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            continue
        array = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = _llama_cpp_permute(
                array, config.num_attention_heads, config.num_attention_heads
            )
        elif hf_name.endswith("k_proj.weight"):
            array = _llama_cpp_permute(
                array, config.num_attention_heads, config.num_key_value_heads
            )
        if quantize_blocks and gguf_name.startswith("blk.") and array.ndim == 2:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                f"{gguf_name}.{suffix}", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
