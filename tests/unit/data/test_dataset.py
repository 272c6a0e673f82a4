import pytest

from hpt_megatron.config.data import DataConfig
from hpt_megatron.data import (
    QWEN_MATH_SYSTEM_PROMPT,
    PromptSampler,
    PromptTemplate,
    RawExample,
    TokenizeOptions,
    build_arithmetic_tokenizer,
    build_prompt_dataset,
    build_sampler,
    load_file_dataset,
    tokenize_examples,
)


@pytest.fixture(scope="module")
def tok():
    return build_arithmetic_tokenizer()


def _example(question="1+2=?", demo="1+2=3\n\\boxed{3}", system="You are R1."):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return RawExample(messages=messages, ground_truth="3", demonstration=demo, source="f", row=0)


def test_chat_template_drops_dataset_system_and_adds_qwen_math_prompt(tok):
    text = PromptTemplate().render(_example().messages, tok)
    assert text == f"<|bos|><|system|>{QWEN_MATH_SYSTEM_PROMPT}<|user|>1+2=?<|assistant|>"
    kept = PromptTemplate(drop_dataset_system=False).render(_example().messages, tok)
    assert "You are R1." in kept and QWEN_MATH_SYSTEM_PROMPT not in kept
    bare = PromptTemplate(system_prompt=None).render(_example().messages, tok)
    assert bare == "<|bos|><|user|>1+2=?<|assistant|>"


def test_llama_zero_and_raw_templates(tok):
    text = PromptTemplate(kind="llama_zero").render(_example().messages, tok)
    assert text == (
        "Question:\n1+2=?\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.\nAnswer:\nLet's think step by step."
    )
    assert PromptTemplate(kind="raw").render(_example().messages, tok) == "1+2=?"
    raw_sys = PromptTemplate(kind="raw", drop_dataset_system=False)
    assert raw_sys.render(_example().messages, tok) == "You are R1.\n\n1+2=?"


def test_chat_template_needs_one(tok):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="data.template"):
        PromptTemplate().render(_example().messages, NoTemplate())


def test_demonstrations_have_no_special_tokens_and_end_with_eos(tok):
    ds = tokenize_examples([_example()], tok, template=PromptTemplate(), options=TokenizeOptions())
    demo = ds[0].demo_ids
    assert demo[-1] == tok.eos_token_id and tok.bos_token_id not in demo
    assert tok.decode(demo[:-1]) == "1+2=3\n\\boxed{3}"
    assert ds[0].prompt_ids == tok(ds[0].prompt_text, add_special_tokens=False)["input_ids"]
    assert ds[0].prompt_ids[0] == tok.bos_token_id


def test_overlong_filter_and_truncate(tok):
    examples = [_example(), _example(question="9" * 300), _example(demo="7" * 300)]
    template = PromptTemplate(system_prompt=None)
    opts = TokenizeOptions(max_prompt_tokens=50, max_response_tokens=100)
    ds = tokenize_examples(examples, tok, template=template, options=opts)
    assert len(ds) == 1 and ds.stats.overlong_filtered == 2
    opts.overlong = "truncate"
    ds = tokenize_examples(examples, tok, template=template, options=opts)
    assert len(ds) == 3 and ds.stats.prompts_truncated == 1 and ds.stats.demos_truncated == 1
    assert len(ds[1].prompt_ids) == 50 and tok.decode(ds[1].prompt_ids).endswith("<|assistant|>")
    assert len(ds[2].demo_ids) == 100
    with pytest.raises(ValueError, match="data.max_prompt_tokens=5"):
        tokenize_examples(
            examples, tok, template=template, options=TokenizeOptions(max_prompt_tokens=5)
        )


def test_sampler_is_deterministic_and_resumes_exactly():
    records = list(range(10))
    a = PromptSampler(records, 3, seed=7)
    full = [a.next_batch() for _ in range(8)]  # crosses epochs (3 batches each, 1 left over)
    assert all(len(b) == 3 for b in full)
    assert len(set(sum(full[:3], []))) == 9  # no repeats within an epoch
    assert full[:3] != full[3:6]  # a fresh permutation per epoch
    b = PromptSampler(records, 3, seed=7)
    for _ in range(5):
        b.next_batch()
    state = b.state_dict()
    c = PromptSampler(records, 3, seed=7)
    c.load_state_dict(state)
    assert [c.next_batch() for _ in range(3)] == full[5:8]
    assert PromptSampler(records, 3, seed=8).next_batch() != full[0]
    assert PromptSampler(records, 3, shuffle=False).next_batch() == [0, 1, 2]


def test_sampler_rejects_mismatched_state_and_sizes():
    with pytest.raises(ValueError, match="data.prompts_per_step"):
        PromptSampler(list(range(2)), 3)
    state = PromptSampler(list(range(10)), 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="taken on 10 prompts"):
        PromptSampler(list(range(11)), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed/shuffle"):
        PromptSampler(list(range(10)), 2, seed=2).load_state_dict(state)


def test_file_dataset_from_config(shared_data, tok):
    cfg = DataConfig(train=str(shared_data / "eval/luffy/valid.gpqa.parquet"), prompts_per_step=4)
    cfg.max_prompt_tokens = 16384
    ds = build_prompt_dataset(cfg, tok)
    assert len(ds) == 198 and ds[0].data_source == "gpqa" and ds[0].demo_ids is None
    assert (
        ds[0].prompt_id == "valid.gpqa.parquet:0" and "<|system|>Please reason" in ds[0].prompt_text
    )
    assert "systematic, thorough reasoning" not in ds[0].prompt_text  # dataset system dropped
    sampler = build_sampler(cfg, ds, run_seed=3)
    batch = sampler.next_batch()
    assert len(batch) == 4 and all(r.ground_truth in "ABCD" for r in batch)
    cfg.max_prompt_tokens = 1000
    assert len(load_file_dataset(cfg.train, tok, cfg)) < 198  # long prompts filtered
