"""Router statistics of Megatron's mixture-of-experts layers: how evenly tokens spread over the
experts, measured on the training forward passes of a step.

Forward hooks on each ``TopKRouter`` record, per layer, the tokens routed to every expert and the
sum over tokens of the router's softmax over all experts. :meth:`RouterStats.collect` sums them
over the ranks and reports:

- ``moe/load_balancing_loss``: the switch load-balancing loss, unscaled (coefficient 1), as
  Megatron's ``switch_load_balancing_loss_func`` defines it, ``E / (k T^2) * sum_e P_e * n_e`` with
  ``P_e`` the summed probabilities and ``n_e`` the tokens of expert ``e`` over the step's ``T``
  tokens: 1 when routing is uniform; averaged over the expert layers. It is a metric whatever
  ``model.moe_aux_loss_coeff`` is (that coefficient puts Megatron's own, per micro-batch, loss
  into the gradient).
- ``moe/tokens_per_expert_max`` / ``moe/tokens_per_expert_mean`` and their ratio
  ``moe/expert_load_max_over_mean`` (the worst layer's): 1 is perfect balance, ``E / k`` all
  tokens on the same k experts.

No token is dropped (no capacity factor is set), so there is no dropped-token share to report.
Padding tokens of right-padded micro-batches are routed too and are counted.

Routing replay (``algorithm.options.routing_replay: rollout``, slime's R3): :class:`RoutingReplay`
makes every router of the policy take the experts the rollout engine chose for each token
(``MicroBatch.routed_experts_bsmk``) instead of its own top-k. It goes through Megatron's own
hook, ``TopKRouter.router_replay`` (``megatron.core.transformer.moe.router_replay``), which
``topk_routing_with_score_function`` asks for the top-k: the replayed indices are used and their
probabilities gathered from the trainer's own router scores, so the router still gets gradients
(R3). ``TokenReplay`` extends Megatron's replay in one way: a token whose recorded index is
-1 (a demonstration row, a response's last token, which the engine never ran, padding) keeps
the router's own choice, so one micro-batch can mix replayed and routed rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


class RouterStats:
    """Accumulates router statistics of this rank's MoE layers between :meth:`collect` calls."""

    def __init__(self, routers: dict[int, Any], num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        # Per global layer: [tokens per expert (E), summed probabilities (E), tokens (1)].
        self.sums = torch.zeros(num_layers, 2 * num_experts + 1, dtype=torch.float64)
        self.handles = [
            router.register_forward_hook(self._hook(layer)) for layer, router in routers.items()
        ]

    @classmethod
    def attach(cls, chunks: Sequence[torch.nn.Module]) -> RouterStats | None:
        """Hooks on every router of ``chunks`` (DDP-wrapped or not); ``None`` for dense models."""
        routers = _routers(chunks)
        if not routers:
            return None
        config = next(iter(routers.values())).config
        return cls(routers, config.num_layers, config.num_moe_experts, config.moe_router_topk)

    def _hook(self, layer: int):
        def record(module: Any, args: tuple, output: tuple) -> None:
            if not module.training:
                return
            _, routing_map = output
            with torch.no_grad():
                probs = torch.softmax(module.gating(args[0].detach()).float(), dim=-1)
                probs = probs.reshape(-1, self.num_experts)
                row = self.sums[layer]
                row[: self.num_experts] += routing_map.sum(0).double().cpu()
                row[self.num_experts : -1] += probs.sum(0).double().cpu()
                row[-1] += probs.shape[0]

        return record

    def collect(self, group: dist.ProcessGroup | None, counts: bool = True) -> dict[str, float]:
        """Collective over ``group`` (every rank; ``None``: this rank alone): the step's metrics,
        then a fresh start. ``counts=False`` leaves this rank's numbers out (a tensor-parallel
        rank other than 0, whose routers saw the same tokens as rank 0)."""
        sums = self.sums if counts else torch.zeros_like(self.sums)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        self.sums = torch.zeros_like(self.sums)
        e, k = self.num_experts, self.top_k
        layers = [row for row in sums if row[-1] > 0]
        if not layers:
            return {}
        lb, worst, most, mean = [], 0.0, 0.0, 0.0
        for row in layers:
            tokens, probs, total = row[:e], row[e:-1], float(row[-1])
            lb.append(float((probs * tokens).sum()) * e / (k * total * total))
            worst = max(worst, float(tokens.max() / tokens.mean()))
            most += float(tokens.max()) / len(layers)
            mean += float(tokens.mean()) / len(layers)
        return {
            "moe/load_balancing_loss": sum(lb) / len(lb),
            "moe/expert_load_max_over_mean": worst,
            "moe/tokens_per_expert_max": most,
            "moe/tokens_per_expert_mean": mean,
        }


def _routers(chunks: Sequence[torch.nn.Module]) -> dict[int, Any]:
    """``{global layer index (0-based): TopKRouter}`` of every MoE layer of ``chunks``."""
    routers: dict[int, Any] = {}
    for chunk in chunks:
        for module in chunk.modules():
            layer = getattr(module, "layer_number", None)
            router = getattr(getattr(module, "mlp", None), "router", None)
            if layer is not None and router is not None:
                routers[int(layer) - 1] = router
    return routers


def token_replay() -> Any:
    """A new ``TokenReplay`` (the class is made on first use: it subclasses Megatron's)."""
    return _token_replay_class()()


@functools.cache
def _token_replay_class() -> type:
    from megatron.core.transformer.moe.router_replay import RouterReplay

    class TokenReplay(RouterReplay):
        """Megatron's per-router replay with a fallback per token: rows of the target whose
        index is -1 take the router's own top-k. Without a target the router routes as usual."""

        def __init__(self) -> None:
            super().__init__()
            self.counts: torch.Tensor | None = None  # [replayed tokens, changed tokens]
            # Megatron keeps every instance in a process-wide list for its global setters;
            # this replay is driven per chunk by RoutingReplay, so it stays out of that list.
            RouterReplay.global_router_replay_instances.remove(self)

        def get_replay_topk(
            self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None
        ):
            assert default_compute_topk is not None
            own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            target = self.target_topk_idx
            if target is None:
                return own
            target = target.to(scores.device)
            if target.shape != own[1].shape:
                raise ValueError(
                    f"routing replay: {tuple(target.shape)} recorded expert ids for a router "
                    f"that routes {tuple(own[1].shape)} (tokens x top-k)"
                )
            index = torch.where(target >= 0, target, own[1])
            with torch.no_grad():  # tokens whose replayed experts are not the router's own
                known = target[:, 0] >= 0
                changed = (index.sort(-1).values != own[1].sort(-1).values).any(-1) & known
                counts = torch.stack([known.sum(), changed.sum()]).double()
                self.counts = counts if self.counts is None else self.counts + counts
            return scores.gather(1, index), index

    return TokenReplay


class RoutingReplay:
    """Replays recorded experts on the routers of a policy's model chunks (see the module
    docstring). :meth:`load` before each micro-batch's forward on a chunk."""

    def __init__(self, routers: dict[int, Any], sequence_parallel: bool, tp_rank: int, tp: int):
        self.sequence_parallel, self.tp_rank, self.tp = sequence_parallel, tp_rank, tp
        freq = next(iter(routers.values())).config.moe_layer_freq
        sparse = [i for i, on in enumerate(freq) if on] if isinstance(freq, list) else None
        # Global layer -> its index among the MoE layers (the record's second axis).
        self.moe_index = {
            layer: (sparse.index(layer) if sparse is not None else layer // int(freq))
            for layer in routers
        }
        config = next(iter(routers.values())).config
        self.num_moe_layers = len(sparse) if sparse is not None else -(-config.num_layers // freq)
        self.num_experts = config.num_moe_experts
        self.replays: dict[int, Any] = {}
        self._chunk_layers: dict[int, list[int]] = {}
        for layer, router in routers.items():
            router.router_replay = self.replays[layer] = token_replay()

    @classmethod
    def attach(
        cls, chunks: Sequence[torch.nn.Module], tp_rank: int = 0, tp: int = 1
    ) -> RoutingReplay:
        routers = _routers(chunks)
        if not routers:
            raise ValueError("routing replay: the model has no mixture-of-experts layer")
        config = next(iter(routers.values())).config
        if config.moe_router_fusion:  # TE's fused top-k never asks router_replay
            raise ValueError("routing replay: Megatron's fused router (moe_router_fusion) skips it")
        return cls(routers, bool(config.sequence_parallel), tp_rank, tp)

    def load(self, chunk: torch.nn.Module, experts_bsmk: torch.Tensor | None) -> None:
        """The experts ``[B, S, MoE layers, k]`` (-1: the router's own) of the micro-batch
        ``chunk`` runs next, on its routers; None: its routers route themselves."""
        if experts_bsmk is not None:
            layers, top = experts_bsmk.shape[2], int(experts_bsmk.max())
            if layers != self.num_moe_layers or top >= self.num_experts:
                raise ValueError(
                    f"routing replay: recorded experts for {layers} MoE layers with ids up to "
                    f"{top}; the model has {self.num_moe_layers} MoE layers of "
                    f"{self.num_experts} experts"
                )
        for layer in self._layers_of(chunk):
            replay = self.replays[layer]
            if experts_bsmk is None:
                replay.clear_indices()
                continue
            # Megatron's routers see tokens sequence-major ([S, B] flattened), a sequence-
            # parallel rank its own slice of the sequence.
            experts_sbk = experts_bsmk[:, :, self.moe_index[layer]].transpose(0, 1)
            if self.sequence_parallel and self.tp > 1:
                part = experts_sbk.shape[0] // self.tp
                experts_sbk = experts_sbk[self.tp_rank * part : (self.tp_rank + 1) * part]
            replay.target_topk_idx = experts_sbk.reshape(-1, experts_sbk.shape[-1]).long()

    def collect(self, group: dist.ProcessGroup | None, counts: bool = True) -> dict[str, float]:
        """Collective over ``group`` (``None``: this rank alone), as ``RouterStats.collect``:
        ``moe/replay_changed_frac``, the share of replayed (token, MoE layer) pairs whose
        recorded experts are not the ones the trainer's router would pick, since the last call
        (every forward pass counts: pi_old's and the training ones)."""
        total = torch.zeros(2, dtype=torch.float64)
        for replay in self.replays.values():
            if replay.counts is not None and counts:
                total += replay.counts.cpu()
            replay.counts = None
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        if total[0] == 0:
            return {}
        return {"moe/replay_changed_frac": float(total[1] / total[0])}

    def _layers_of(self, chunk: torch.nn.Module) -> list[int]:
        if id(chunk) not in self._chunk_layers:
            self._chunk_layers[id(chunk)] = sorted(_routers([chunk]))
        return self._chunk_layers[id(chunk)]
