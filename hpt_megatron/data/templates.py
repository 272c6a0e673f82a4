"""Prompt templates: the tokenizer's chat template, the paper's LLaMA "zero" template, raw text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
LLAMA_ZERO_TEMPLATE = (
    "Question:\n{question}\nPlease reason step by step, and put your final answer within "
    "\\boxed{{}}.\nAnswer:\nLet's think step by step."
)

TemplateKind = Literal["chat", "llama_zero", "raw"]


@dataclass(kw_only=True)
class PromptTemplate:
    """How chat messages become prompt text.

    Args:
        kind: ``"chat"`` (the tokenizer's chat template), ``"llama_zero"`` (docs/paper.md) or
            ``"raw"`` (the question text itself).
        system_prompt: Added as the system message by ``"chat"`` when no system message is left
            after dropping the dataset's own; None adds none.
        drop_dataset_system: Remove the dataset's system messages (the paper did, for the
            R1-style system prompt in the LUFFY files).
    """

    kind: TemplateKind = "chat"
    system_prompt: str | None = QWEN_MATH_SYSTEM_PROMPT
    drop_dataset_system: bool = True

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The chat messages after dropping/adding the system message."""
        kept = [m for m in messages if not (self.drop_dataset_system and m["role"] == "system")]
        if self.system_prompt and not any(m["role"] == "system" for m in kept):
            kept = [{"role": "system", "content": self.system_prompt}, *kept]
        return kept

    def render(self, messages: list[dict[str, str]], tokenizer: Any) -> str:
        """The prompt text (for ``"chat"``, ending with the assistant's generation prompt)."""
        if self.kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "data.template: 'chat' needs a tokenizer with a chat template; "
                    "use 'raw' or 'llama_zero'"
                )
            return tokenizer.apply_chat_template(
                self.messages(messages), tokenize=False, add_generation_prompt=True
            )
        question = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
        if self.kind == "llama_zero":
            return LLAMA_ZERO_TEMPLATE.format(question=question)
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system and not self.drop_dataset_system:
            return "\n\n".join([*system, question])
        return question

    @property
    def adds_special_tokens(self) -> bool:
        """Whether the prompt text is tokenised with the tokenizer's special tokens (BOS).

        Only ``"raw"`` is. Chat templates write BOS themselves; ``"llama_zero"`` gets none, as
        in the official code: its LLaMA runs (Unify-Post-Training exp_scripts/train_llama.sh:
        51-53, ``data.zero``) format the text and tokenise it with ``add_special_tokens=False``
        (hpt/verl/verl/utils/torch_functional.py:236, via rl_dataset_with_target.py:110-124).
        """
        return self.kind == "raw"
