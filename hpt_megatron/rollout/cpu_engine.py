"""A rollout engine on CPU: a Hugging Face causal LM with a hand-written batched decode loop.

The embedded default and CI generate with this engine. It batches prompts with left padding,
prefills each distinct prompt once and copies its KV cache to the ``n`` samples, then decodes
with the KV cache under ``torch.inference_mode``, dropping finished rows from the batch as they
accumulate. Per step it samples with temperature / top-k / top-p from a seeded generator and
records two log-probs per token (see ``hpt_megatron.rollout.sampling``):
``Generation.logprobs`` (raw model, temperature 1) and ``Generation.sampling_logprobs``.

With ``record_routing`` (routing replay of mixture-of-experts models) forward hooks on the HF
routers (``mlp.gate`` of each sparse layer) record the top-k expert ids HF chose for every token
the model ran: the prompt's in the prefill, each response token's in the decode step that feeds
it (the last response token is never run). ``Generation.routed_experts`` carries them.

Shape legend: B = rows (prompt x sample) in a chunk, L = padded prompt length, T = new tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PretrainedConfig

from hpt_megatron.data.sample import compact_expert_ids
from hpt_megatron.models.hf_config import HFModelConfig
from hpt_megatron.models.hf_io import fused_expert_slot, fused_expert_view, open_safetensors
from hpt_megatron.rollout.base import Generation, SamplingParams, WeightBucket
from hpt_megatron.rollout.sampling import sample_tokens, validate_sampling
from hpt_megatron.rollout.stop import StopStringMatcher

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class _Chunk:
    """Results of one chunk of rows, filled in by the decode loop."""

    tokens_bt: torch.Tensor
    raw_bt: torch.Tensor
    sampled_bt: torch.Tensor
    length_b: torch.Tensor  # tokens kept per row
    stopped_b: torch.Tensor  # True: EOS / stop token / stop string; False: hit max_new_tokens
    version_bt: torch.Tensor  # the weight version each token was sampled with
    # Routing replay: expert ids [prompts, L, MoE layers, k] of the prefill (left padded) and
    # [B, T, MoE layers, k] of the decode steps (token t's, when it was fed back); else None.
    prompt_experts_plmk: torch.Tensor | None = None
    experts_btmk: torch.Tensor | None = None
    prompt_lengths: list[int] | None = None


class HFCpuEngine:
    """Rollout engine running a transformers causal LM on CPU (implements ``RolloutEngine``).

    Args:
        model: a causal LM (``AutoModelForCausalLM``); put in eval mode, kept on CPU.
        tokenizer: needed only for stop strings; a ``PreTrainedTokenizerBase``.
        max_batch_rows: most (prompt x sample) rows decoded together.
        threads: torch intra-op threads while generating (restored after); None: leave as set.
        eos_token_ids: always stop on these; default: the model's generation/config EOS ids.
        pad_token_id: filler for left padding and finished rows; default: the first EOS id.
        record_routing: record the experts every MoE router chose per token (routing replay);
            a model without MoE layers is an error.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: object | None = None,
        *,
        max_batch_rows: int = 512,
        eos_token_ids: Iterable[int] | None = None,
        pad_token_id: int | None = None,
        threads: int | None = None,
        record_routing: bool = False,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_rows = max_batch_rows
        self.eos_token_ids = (
            sorted(set(eos_token_ids)) if eos_token_ids is not None else _model_eos_ids(model)
        )
        fallback_pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = fallback_pad if pad_token_id is None else pad_token_id
        self.weight_version = 0
        # Called between two decode steps (partial rollouts: it may load new weights).
        self.decode_hook: Callable[[], None] | None = None
        self._params = dict(model.state_dict(keep_vars=True))
        self._closed = False
        # transformers >= 5.2x names the cache argument ``cache``; older ones ``past_key_values``.
        forward_args = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"
        self._routers = _moe_routers(model) if record_routing else []
        if record_routing and not self._routers:
            raise ValueError("record_routing: the model has no mixture-of-experts layer")
        self._routed: list[torch.Tensor] = []  # per router, the last forward's [tokens, k]
        for router in self._routers:
            router.register_forward_hook(self._record_hook)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        tokenizer_path: str | Path | None = None,
        load_tokenizer: bool = True,
        tokenizer: object | None = None,
        **kwargs: object,
    ) -> HFCpuEngine:
        """Load an HF model folder (and its tokenizer if present, unless ``tokenizer`` is given)
        for CPU generation."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"rollout model path {path}: no config.json (not an HF model folder)")
        if dtype not in _DTYPES:
            raise ValueError(f"rollout dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        for shard in sorted(path.glob("*.safetensors")):  # a truncated one, named
            with open_safetensors(shard):
                pass
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
        if tokenizer is None and load_tokenizer:
            tokenizer = _try_load_tokenizer(Path(tokenizer_path) if tokenizer_path else path)
        return cls(model, tokenizer, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_config(
        cls,
        config: HFModelConfig | PretrainedConfig | str | Path,
        *,
        seed: int = 0,
        dtype: str = "float32",
        **kwargs: object,
    ) -> HFCpuEngine:
        """A randomly initialised model from an HF config (ours or transformers', a folder or a
        config.json), its weights in ``dtype``, drawn from ``seed`` (torch's global generator is
        left as it was)."""
        if dtype not in _DTYPES:
            raise ValueError(f"rollout dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        if isinstance(config, HFModelConfig):
            config = config.to_transformers()
        elif not isinstance(config, PretrainedConfig):
            config = AutoConfig.from_pretrained(config)
        with torch.random.fork_rng(devices=[]):  # HF's init draws from the global generator
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
        return cls(model, **kwargs)  # type: ignore[arg-type]

    # -- routing ------------------------------------------------------------------------------

    def _record_hook(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        # Routers run in layer order within a forward; ``_routed`` is reset before each.
        self._routed.append(_topk_indices(output, module))

    def _take_routing(self, rows: int, seq: int) -> torch.Tensor | None:
        """The last forward's expert ids as ``[rows, seq, MoE layers, k]`` (None: not recording)."""
        if not self._routers:
            return None
        routed, self._routed = self._routed, []
        if len(routed) != len(self._routers):
            raise RuntimeError(f"{len(routed)} routers ran, the model has {len(self._routers)}")
        return torch.stack(routed, dim=1).reshape(rows, seq, len(routed), -1)

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Return ``params.n`` generations per prompt, grouped by prompt in prompt order."""
        self._check_open()
        validate_sampling(params)
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: at least one token is needed")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: build the engine with one")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        per_chunk = max(1, self.max_batch_rows // params.n)
        out: list[Generation] = []
        with _intra_op_threads(self.threads):
            for start in range(0, len(prompts), per_chunk):
                chunk_prompts = prompts[start : start + per_chunk]
                chunk = self._generate_chunk(chunk_prompts, params, generator)
                out.extend(self._to_generations(chunk, start, params.n))
        return out

    @torch.inference_mode()
    def _generate_chunk(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> _Chunk:
        n, T = params.n, params.max_new_tokens
        stop_ids = torch.tensor(sorted({*self.eos_token_ids, *params.stop_token_ids}))
        matcher = (
            StopStringMatcher(self.tokenizer, params.stop_strings) if params.stop_strings else None
        )
        ids_bl, mask_bl = self._left_pad(prompts)
        pos_bl = (mask_bl.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self._routed = []
        logits = self.model(
            input_ids=ids_bl,
            attention_mask=mask_bl,
            position_ids=pos_bl,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        ).logits[:, -1]
        prompt_experts = self._take_routing(*ids_bl.shape)
        if n > 1:  # the n samples of a prompt share its prefill
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            mask_bl = mask_bl.repeat_interleave(n, dim=0)
            pos_bl = pos_bl.repeat_interleave(n, dim=0)
        B = logits.shape[0]
        res = _Chunk(
            tokens_bt=torch.full((B, T), self.pad_token_id, dtype=torch.long),
            raw_bt=torch.zeros(B, T),
            sampled_bt=torch.zeros(B, T),
            length_b=torch.full((B,), T, dtype=torch.long),
            stopped_b=torch.zeros(B, dtype=torch.bool),
            version_bt=torch.zeros(B, T, dtype=torch.long),
        )
        if prompt_experts is not None:
            res.prompt_experts_plmk = prompt_experts
            res.experts_btmk = torch.zeros((B, T, *prompt_experts.shape[2:]), dtype=torch.long)
            res.prompt_lengths = [len(p) for p in prompts]
        rows_a = torch.arange(B)  # active rows (A <= B): indices into the chunk
        next_pos_a = pos_bl[:, -1] + 1
        mask_a = mask_bl
        for t in range(T):
            tok_a, sampled_a, raw_a = sample_tokens(logits, params, generator)
            res.tokens_bt[rows_a, t] = tok_a
            res.sampled_bt[rows_a, t] = sampled_a
            res.raw_bt[rows_a, t] = raw_a
            res.version_bt[rows_a, t] = self.weight_version
            done_a = torch.isin(tok_a, stop_ids)
            if matcher is not None:
                done_a |= matcher.matches(res.tokens_bt[rows_a, : t + 1])
            if bool(done_a.any()):
                res.length_b[rows_a[done_a]] = t + 1
                res.stopped_b[rows_a[done_a]] = True
            if t == T - 1:
                break
            keep_a = ~done_a
            if not bool(keep_a.any()):
                break
            if bool(done_a.any()):  # drop finished rows from the batch and the KV cache
                keep_idx = keep_a.nonzero().squeeze(-1)
                cache.batch_select_indices(keep_idx)
                rows_a, tok_a = rows_a[keep_idx], tok_a[keep_idx]
                next_pos_a, mask_a = next_pos_a[keep_idx], mask_a[keep_idx]
            mask_a = torch.cat([mask_a, torch.ones_like(mask_a[:, :1])], dim=-1)
            if self.decode_hook is not None:  # new weights for the next token (the KV cache
                self.decode_hook()  # of the tokens so far stays as the old weights made it)
            logits = self.model(
                input_ids=tok_a[:, None],
                attention_mask=mask_a,
                position_ids=next_pos_a[:, None],
                use_cache=True,
                **{self._cache_kwarg: cache},
            ).logits[:, -1]
            routed = self._take_routing(len(rows_a), 1)
            if res.experts_btmk is not None and routed is not None:  # token t's, just fed in
                res.experts_btmk[rows_a, t] = routed[:, 0]
            next_pos_a = next_pos_a + 1
        return res

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(p) for p in prompts)
        ids_bl = torch.full((len(prompts), L), self.pad_token_id, dtype=torch.long)
        mask_bl = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids_bl[i, L - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask_bl[i, L - len(prompt) :] = 1
        return ids_bl, mask_bl

    def _to_generations(self, chunk: _Chunk, first_prompt: int, n: int) -> list[Generation]:
        tokens, raw, sampled = chunk.tokens_bt.tolist(), chunk.raw_bt.tolist(), chunk.sampled_bt
        sampled_list, versions = sampled.tolist(), chunk.version_bt.tolist()
        out = []
        for b, (length, stopped) in enumerate(
            zip(chunk.length_b.tolist(), chunk.stopped_b.tolist())
        ):
            row_versions = versions[b][:length]
            out.append(
                Generation(
                    prompt_index=first_prompt + b // n,
                    token_ids=tokens[b][:length],
                    logprobs=raw[b][:length],
                    sampling_logprobs=sampled_list[b][:length],
                    finish_reason="stop" if stopped else "length",
                    weight_version=row_versions[0] if length else self.weight_version,
                    # Per token only when a push landed mid-response (else weight_version says
                    # it all, and the batch every rank receives stays small).
                    token_versions=row_versions if len(set(row_versions)) > 1 else None,
                    routed_experts=_row_experts(chunk, b, n, length),
                )
            )
        return out

    # -- weights and lifecycle ----------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """Copy HF-named full tensors into the model in place (names and shapes are checked).

        Raises:
            ValueError: a name the model does not have, or a shape that differs from the model's.
        """
        self._check_open()
        count = 0
        for bucket in buckets:
            for name, tensor in bucket:
                target = self._target(name)
                if target is None:
                    known = ", ".join(sorted(self._params)[:5])
                    raise ValueError(
                        f"update_weights: unknown weight {name!r} (model has e.g. {known}, ...)"
                    )
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(target.shape)}"
                    )
                target.copy_(tensor.detach().to(device=target.device, dtype=target.dtype))
                count += 1
        self.weight_version = version
        logger.debug("cpu engine: %d tensors updated, weight version %d", count, version)

    def _target(self, name: str) -> torch.Tensor | None:
        """The model tensor an HF-named weight goes into: its own parameter, or (experts) the
        expert's slice of transformers 5's fused expert tensors."""
        target = self._params.get(name)
        slot = fused_expert_slot(name) if target is None else None
        if slot is not None and slot[0] in self._params:
            fused = self._params[slot[0]]
            if slot[1] < fused.shape[0]:
                return fused_expert_view(fused, slot[1], slot[2])
        return target

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        """Load every ``*.safetensors`` file of an HF folder into the model in place."""
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"update_weights_from_disk: no *.safetensors files in {path}")
        self.update_weights((list(load_file(f).items()) for f in files), version)

    def release_memory(self) -> None:
        """Nothing to release: on CPU the engine and the trainer share host memory."""

    def resume_memory(self) -> None:
        """See ``release_memory``."""

    def health(self) -> bool:
        return not self._closed

    @property
    def restarts(self) -> int:
        return 0  # in process: nothing to restart

    def shutdown(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the CPU rollout engine was shut down")


def _moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routers (``mlp.gate`` beside ``mlp.experts``) of an HF causal LM, in layer order."""
    routers = []
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        gate = getattr(mlp, "gate", None)
        if isinstance(gate, torch.nn.Module) and hasattr(mlp, "experts"):
            routers.append(gate)
    return routers


def _topk_indices(output: object, router: torch.nn.Module) -> torch.Tensor:
    """The top-k expert ids ``[tokens, k]`` of an HF router's output: transformers 5's
    ``TopKRouter`` returns ``(logits, scores, indices)``; a plain linear gate returns logits,
    ranked as HF's MoE blocks rank them (softmax, top-k)."""
    if isinstance(output, tuple):
        return output[2].detach().reshape(-1, output[2].shape[-1])
    assert isinstance(output, torch.Tensor)
    top_k = int(getattr(router, "top_k", 0) or 0)
    if top_k < 1:
        raise ValueError(f"record_routing: router {type(router).__name__} has no top_k")
    probs = torch.softmax(output.detach().reshape(-1, output.shape[-1]).float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1).indices


def _row_experts(chunk: _Chunk, b: int, n: int, length: int) -> torch.Tensor | None:
    """Row ``b``'s expert ids: its prompt's (from the shared prefill), then its response
    tokens but the last, ``[prompt + length - 1, MoE layers, k]``."""
    if chunk.prompt_experts_plmk is None or chunk.experts_btmk is None:
        return None
    assert chunk.prompt_lengths is not None
    p = b // n
    prompt = chunk.prompt_experts_plmk[
        p, chunk.prompt_experts_plmk.shape[1] - chunk.prompt_lengths[p] :
    ]
    return compact_expert_ids(torch.cat([prompt, chunk.experts_btmk[b, : length - 1]]))


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model_eos_ids(model: torch.nn.Module) -> list[int]:
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos is not None:
            ids.update(int(e) for e in eos)
    return sorted(ids)


def _try_load_tokenizer(path: Path) -> object | None:
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
