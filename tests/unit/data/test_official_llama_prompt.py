"""The LLaMA "zero" prompt is tokenised without BOS, as the official LLaMA runs tokenise it.

Unify-Post-Training exp_scripts/train_llama.sh:51-53 sets ``data.zero=True`` with
``zero_temp = "Question:\\n{prompt}\\nAnswer:\\nLet's think step by step."`` and the suffix
``"\\nPlease reason step by step, and put your final answer within \\boxed{}."`` appended to the
question (hpt/verl/verl/utils/dataset/rl_dataset.py:143-146); rl_dataset_with_target.py:110-124
formats it and calls ``tokenize_and_postprocess_data``, which runs ``tokenizer(prompt,
add_special_tokens=False)`` (hpt/verl/verl/utils/torch_functional.py:236): the ids are the
text's tokens alone, no BOS.
"""

from hpt_megatron.data import (
    PromptTemplate,
    RawExample,
    TokenizeOptions,
    build_arithmetic_tokenizer,
    tokenize_examples,
)

OFFICIAL_ZERO = "Question:\n{prompt}\nAnswer:\nLet's think step by step."
OFFICIAL_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


class BosTokenizer:
    """The arithmetic tokenizer, prepending BOS under ``add_special_tokens=True`` as LLaMA-3's
    tokenizer does (``<|begin_of_text|>``)."""

    def __init__(self) -> None:
        self.tok = build_arithmetic_tokenizer()
        self.eos_token_id = self.tok.eos_token_id
        self.bos_token_id = self.tok.bos_token_id

    def __call__(self, texts, add_special_tokens: bool = True):
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        if add_special_tokens:
            ids = [[self.bos_token_id, *row] for row in ids]
        return {"input_ids": ids}


def _example() -> RawExample:
    messages = [{"role": "user", "content": "12+34=?"}]
    return RawExample(messages=messages, ground_truth="46", demonstration=None, source="f", row=0)


def test_llama_zero_ids_are_the_official_ones():
    tok = BosTokenizer()
    template = PromptTemplate(kind="llama_zero", system_prompt=None)
    ds = tokenize_examples([_example()], tok, template=template, options=TokenizeOptions())
    official_text = OFFICIAL_ZERO.format(prompt="12+34=?" + OFFICIAL_SUFFIX)
    assert ds[0].prompt_text == official_text
    assert ds[0].prompt_ids == tok([official_text], add_special_tokens=False)["input_ids"][0]
    assert tok.bos_token_id not in ds[0].prompt_ids


def test_raw_prompts_keep_the_tokenizers_special_tokens():
    tok = BosTokenizer()
    template = PromptTemplate(kind="raw", system_prompt=None)
    ds = tokenize_examples([_example()], tok, template=template, options=TokenizeOptions())
    assert ds[0].prompt_ids[0] == tok.bos_token_id
    assert ds[0].prompt_ids == tok(["12+34=?"])["input_ids"][0]
