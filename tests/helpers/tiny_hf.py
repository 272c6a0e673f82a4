"""Tiny random Hugging Face models and a byte-level tokenizer, built locally (no hub access).

Used by the rollout tests, the SGLang test tier and the SGLang benchmarks: every model here is
random, so only shapes and numerics are meaningful, never the text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|bos|>")

# A random Qwen2.5-0.5B-shaped model (the real one's config, random weights): ~494M parameters.
QWEN25_05B_SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token ids 0..255 are the bytes, then the special tokens.

    Every string round-trips exactly, one token per byte, which makes stop-string tests exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_chars.sort(key=lambda ch: _BYTE_OF_CHAR[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        bos_token=SPECIAL_TOKENS[2],
    )


def _byte_level_map() -> dict[str, int]:
    # GPT-2's byte -> printable-character table, inverted (the order ByteLevel uses).
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_BYTE_OF_CHAR = _byte_level_map()


def tiny_config(
    arch: str = "qwen2",
    *,
    vocab_size: int = 320,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    **overrides: object,
) -> PretrainedConfig:
    """The config of a tiny random causal LM (``arch``: ``qwen2`` or ``llama``)."""
    from transformers import LlamaConfig, Qwen2Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in classes:
        raise ValueError(f"arch: expected one of {sorted(classes)}, got {arch!r}")
    eos = 256  # SPECIAL_TOKENS[0] in build_byte_tokenizer()
    kwargs: dict[str, object] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos,
        bos_token_id=eos + 2,
        pad_token_id=eos + 1,
        torch_dtype="float32",
    )
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def build_tiny_model(
    path: str | Path | None = None,
    *,
    config: PretrainedConfig | None = None,
    seed: int = 0,
    init_std: float = 0.5,
    with_tokenizer: bool = True,
) -> torch.nn.Module:
    """Build a random causal LM (default: ``tiny_config()``) and optionally save it to ``path``.

    ``init_std`` is large so that a random tiny model has peaked, input-dependent distributions
    (a model at the usual 0.02 is nearly uniform, which makes greedy tests flaky).
    """
    config = config or tiny_config()
    torch.manual_seed(seed)
    config.initializer_range = init_std
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if path is not None:
        path = Path(path)
        model.save_pretrained(path)
        if with_tokenizer:
            build_byte_tokenizer().save_pretrained(path)
    return model


def greedy_tokens(
    model: torch.nn.Module, prompt: list[int], n: int, *, stop_at_eos: bool = False
) -> list[int]:
    """HF's greedy continuation of ``prompt``: ``n`` tokens, or up to the model's EOS."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None if stop_at_eos else [],
        )
    return out[0, len(prompt) :].tolist()


def teacher_forced_logprobs(
    model: torch.nn.Module, prompt: list[int], response: list[int]
) -> torch.Tensor:
    """HF's log-probs of each ``response`` token after ``prompt`` and the tokens before it."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def assert_same_hf_weights(got: Path, want: Path) -> None:
    """Every tensor of the HF folder ``want`` is in ``got``, bit for bit (as float), and nothing
    else is; neither folder is empty."""
    from safetensors.torch import load_file

    folders: list[dict[str, torch.Tensor]] = []
    for folder in (got, want):
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(shard))
        folders.append(tensors)
    synced, final = folders
    assert synced.keys() == final.keys() and synced
    for name, tensor in final.items():
        assert synced[name].float().equal(tensor.float()), name


# A model of the tiny CPU config's vocabulary (examples/tiny_cpu.yaml), smaller than its policy.
TINY_TEACHER = dict(
    vocab_size=128,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=128,
    eos_token_id=2,
    bos_token_id=1,
    pad_token_id=0,
)


def build_tiny_teacher(
    path: Path, tokenizer: str | None = "arithmetic", seed: int = 0, **fields: object
) -> str:
    """A random teacher for the tiny CPU config saved at ``path``, with the built-in arithmetic
    tokenizer (``tokenizer="bytes"``: another vocabulary; None: no tokenizer); ``fields``
    override ``TINY_TEACHER``."""
    from hpt_megatron.data.tokenizer import build_arithmetic_tokenizer

    build_tiny_model(
        path,
        config=tiny_config("llama", **{**TINY_TEACHER, **fields}),  # type: ignore[arg-type]
        seed=seed,
        with_tokenizer=False,
    )
    if tokenizer == "arithmetic":
        build_arithmetic_tokenizer(path)
    elif tokenizer == "bytes":
        build_byte_tokenizer().save_pretrained(path)
    return str(path)
