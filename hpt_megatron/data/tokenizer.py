"""A character-level tokenizer for the arithmetic task, built locally with ``tokenizers``."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "unk_token": "<|unk|>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# One token for the answer marker keeps demonstrations short.
WORD_TOKENS = ["\\boxed"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_arithmetic_tokenizer(save_dir: str | Path | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` over printable ASCII characters, with a chat template.

    Special tokens: ``<|pad|>`` (0), ``<|bos|>``, ``<|eos|>``, ``<|unk|>``, then the role tokens
    ``<|system|>``, ``<|user|>``, ``<|assistant|>``. ``\\boxed`` is one token. The vocabulary is
    fixed, so the ids are the same on every machine.

    Args:
        save_dir: When given, the tokenizer is saved there (``save_pretrained``).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), *ROLE_TOKENS]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
    # BPE with no merges splits text into characters; unknown characters map to <|unk|>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.add_tokens(WORD_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=ROLE_TOKENS, **SPECIAL_TOKENS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def load_tokenizer(source: str | None, run_dir: str | Path) -> Any:
    """The tokenizer of a run: an HF tokenizer folder (or a file inside one), or, for ``None`` or
    ``"arithmetic"``, the built-in arithmetic tokenizer (saved under ``<run_dir>/tokenizer``)."""
    if source in (None, "arithmetic"):
        return build_arithmetic_tokenizer(Path(run_dir) / "tokenizer")
    from transformers import AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise ValueError(f"model.tokenizer: {source} does not exist")
    return AutoTokenizer.from_pretrained(str(path if path.is_dir() else path.parent))
