"""Worker: the MoE router's load-balancing (aux) loss and z-loss as Megatron adds them.

Builds the policy of the HF folder ``--hf`` twice, once with ``model.moe_aux_loss_coeff`` /
``model.moe_z_loss_coeff`` = ``--aux`` / ``--z`` and once with both 0, and trains one NLL step
of each on the same micro-batches (``--mbs`` of them per data-parallel rank; at EP=2 rank r takes
the samples of micro-batch r of the EP=1 split). Writes JSON (rank 0) with, per rank:

- ``tracker``: Megatron's MoE loss tracker after the step with the coefficients (per layer,
  the loss divided by its coefficient, summed over the micro-batches);
- ``closed_aux`` / ``closed_z``: per micro-batch and layer, the closed forms computed here from
  the logits of the routers' training forward (the router inputs times the router weights):
  ``E / (k T^2) * sum_e P_e n_e`` and ``mean_t logsumexp(logits_t)^2``;
- ``added``: per micro-batch and layer, the losses the router attached to the backward
  (``MoEAuxLossAutoScaler``): the z-loss (with ``--z``), then the aux loss (with ``--aux``);
- ``logged``: the tracker reduced as Megatron's ``track_moe_metrics`` reduces it (over the ranks);
- ``global_aux``: the aux closed form over the tokens of every rank's micro-batch 0 together;

and, on rank 0: ``router_diff``, the router weights' gradients of the run with coefficients minus
those of the run without (both after DDP's reduction), and at EP=1 ``grads``: per parameter the
norm of that difference, of an expected difference and of their gap, the expected one being the
autograd gradient of ``sum over micro-batches and layers of (aux * closed_aux + z * closed_z) / M``
through a separate forward of the model without coefficients.
"""

import argparse
import json
import random

import torch
import torch.distributed as dist
from nll_loss import TokenMeanNLL

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import Sample
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import collate
from hpt_megatron.trainer.build import build_policy, init_policy_weights


def make_samples(n: int, vocab: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 9))]
        resp = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 12))]
        out.append(Sample(prompt_id=str(i), group_id=i, prompt_ids=prompt, response_ids=resp))
    return out


def routers(engine) -> dict[int, torch.nn.Module]:
    """``{layer number (1-based): TopKRouter}``."""
    found = {}
    for chunk in engine.model_chunks:
        for module in chunk.modules():
            router = getattr(getattr(module, "mlp", None), "router", None)
            if router is not None and getattr(module, "layer_number", None) is not None:
                found[int(module.layer_number)] = router
    return found


def router_logits(router: torch.nn.Module, x_sbh: torch.Tensor) -> torch.Tensor:
    """``[S*B, E]`` fp32 logits of the router for its input (Megatron's fp32 router GEMM)."""
    logits = torch.nn.functional.linear(x_sbh.float(), router.weight.float())
    return logits.reshape(-1, logits.shape[-1])


def closed_aux(logits: torch.Tensor, topk: int) -> torch.Tensor:
    tokens, experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(topk, dim=-1).indices
    n_e = torch.zeros_like(probs).scatter(1, chosen, 1.0).sum(0)
    return experts / (topk * tokens * tokens) * (probs.sum(0) * n_e).sum()


def closed_z(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean()


ATTACHED: list[float] = []  # the losses given to MoEAuxLossAutoScaler since the last router


def record_attached_losses() -> None:
    """Wraps ``MoEAuxLossAutoScaler.apply`` (how Megatron's router attaches its z-loss to the
    logits and its aux loss to the probabilities) to record each loss it is given."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    original = MoEAuxLossAutoScaler.apply

    def apply(output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ATTACHED.append(float(loss.detach()))
        return original(output, loss)

    MoEAuxLossAutoScaler.apply = staticmethod(apply)


class Capture:
    """Forward hooks on the routers: each training call's layer, input (live: gradients flow
    through it) and logits (detached, from the weights of that moment: the optimizer step
    changes them later)."""

    def __init__(self, found: dict[int, torch.nn.Module]) -> None:
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.attached: list[list[float]] = []  # per call: the losses its router attached
        self.handles = [r.register_forward_hook(self._hook(n)) for n, r in found.items()]

    def _hook(self, layer: int):
        def record(module, args, output):
            if module.training and torch.is_grad_enabled():
                with torch.no_grad():
                    logits = router_logits(module, args[0])
                self.calls.append((layer, args[0], logits))
                self.attached.append(list(ATTACHED))
            ATTACHED.clear()

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--aux", type=float, default=0.0)
    ap.add_argument("--z", type=float, default=0.0)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--mbs", type=int, default=1, help="micro-batches per rank")
    ap.add_argument("--samples", type=int, default=6)
    args = ap.parse_args()

    from megatron.core.transformer.moe import moe_utils

    parallel = ParallelConfig(ep=args.ep, backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    hf = load_hf_config(f"{args.hf}/config.json")
    trainer_cfg = TrainerConfig(lr=1e-3, grad_clip=0.0, max_tokens_per_microbatch=4096)

    def policy(aux: float, z: float):
        model_cfg = ModelConfig(
            hf_config=f"{args.hf}/config.json",
            hf_weights=args.hf,
            moe_aux_loss_coeff=aux,
            moe_z_loss_coeff=z,
        )
        engine = build_policy(hf, model_cfg, parallel, trainer_cfg, ctx, total_steps=1)
        init_policy_weights(engine, hf, model_cfg)
        return engine

    with_coeff, without = policy(args.aux, args.z), policy(0.0, 0.0)
    config = routers(with_coeff)[next(iter(routers(with_coeff)))].config
    assert config.moe_aux_loss_coeff == args.aux, config.moe_aux_loss_coeff
    topk, splits = config.moe_router_topk, args.mbs * ctx.dp

    samples = make_samples(args.samples, hf.vocab_size)
    total = sum(len(s.response_ids) for s in samples)
    # Micro-batch j of the whole split takes samples j, j + splits, ...; rank r runs the
    # micro-batches r * mbs .. (r + 1) * mbs - 1 of it.
    groups = [list(range(j, len(samples), splits)) for j in range(splits)]
    mine = groups[ctx.dp_rank * args.mbs : (ctx.dp_rank + 1) * args.mbs]
    batches = [collate(samples, g) for g in mine]

    def expected_grads() -> dict[str, torch.Tensor]:
        """Autograd of the closed forms through a forward of the model without coefficients."""
        capture = Capture(routers(without))
        found = routers(without)
        objective = torch.zeros(())
        for mb in batches:
            capture.calls.clear()
            without.model_chunks[0](mb.input_ids_bs, mb.position_ids_bs, None)
            for layer, x, _ in capture.calls:
                logits = router_logits(found[layer], x)
                term = args.aux * closed_aux(logits, topk) + args.z * closed_z(logits)
                objective = objective + term / len(batches)
        capture.remove()
        named = list(without.model_chunks[0].named_parameters())
        got = torch.autograd.grad(objective, [p for _, p in named], allow_unused=True)
        return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, got)}

    expected = expected_grads() if ctx.world_size == 1 else None

    def grads(engine) -> dict[str, torch.Tensor]:
        return {
            n: p.main_grad.detach().clone() for n, p in engine.model_chunks[0].named_parameters()
        }

    without.train_step(batches, TokenMeanNLL(total))
    grads0 = grads(without)

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    moe_utils.clear_aux_losses_tracker()
    record_attached_losses()
    ATTACHED.clear()
    capture = Capture(routers(with_coeff))
    with_coeff.train_step(batches, TokenMeanNLL(total))
    capture.remove()
    grads1 = grads(with_coeff)

    per_mb: list[dict] = []
    layers = len(capture.calls) // len(batches)
    with torch.no_grad():
        for j in range(len(batches)):
            aux, z, sums, added = {}, {}, {}, {}
            calls = capture.calls[j * layers : (j + 1) * layers]
            for (layer, _, logits), losses in zip(calls, capture.attached[j * layers :]):
                added[layer] = losses
                aux[layer], z[layer] = float(closed_aux(logits, topk)), float(closed_z(logits))
                probs = torch.softmax(logits, dim=-1)
                chosen = probs.topk(topk, dim=-1).indices
                n_e = torch.zeros_like(probs).scatter(1, chosen, 1.0).sum(0)
                sums[layer] = torch.cat([probs.sum(0), n_e, torch.tensor([float(len(probs))])])
            per_mb.append({"aux": aux, "z": z, "sums": sums, "added": added})

    # The aux closed form over micro-batch 0 of every rank together (one global batch).
    global_aux = {}
    for layer, row in per_mb[0]["sums"].items():
        row = row.double().clone()
        if ctx.world_size > 1:
            dist.all_reduce(row, group=ctx.cpu_group)
        e = (len(row) - 1) // 2
        global_aux[layer] = float(row[:e] @ row[e:-1]) * e / (topk * float(row[-1]) ** 2)

    raw = {name: entry["values"].tolist() for name, entry in tracker.items()}
    # Megatron's own logging reduction (track_moe_metrics): over PP, the loss's group, then DP.
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    logged = {name: entry["values"].tolist() for name, entry in tracker.items()}

    router_names = [n for n in grads1 if n.endswith("router.weight")]
    result = {
        "rank": ctx.rank,
        "tracker": raw,
        "logged": logged,
        "closed_aux": [{str(k): v for k, v in m["aux"].items()} for m in per_mb],
        "closed_z": [{str(k): v for k, v in m["z"].items()} for m in per_mb],
        "added": [{str(k): v for k, v in m["added"].items()} for m in per_mb],
        "global_aux": {str(k): v for k, v in global_aux.items()},
        "tokens": [int(mb.input_ids_bs.numel()) for mb in batches],
        "router_diff": {n: (grads1[n] - grads0[n]).reshape(-1).tolist() for n in router_names},
    }
    if expected is not None:
        result["grads"] = {
            n: {
                "expected": float(expected[n].norm()),
                "diff": float((grads1[n] - grads0[n]).norm()),
                "gap": float((grads1[n] - grads0[n] - expected[n]).norm()),
                "grad0": float(grads0[n].norm()),
            }
            for n in grads1
        }
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, result, group=ctx.cpu_group)
    if ctx.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(gathered, fh)
    shutdown_distributed()


if __name__ == "__main__":
    main()
