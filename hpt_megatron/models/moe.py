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
"""

from __future__ import annotations

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
        routers: dict[int, Any] = {}
        config = None
        for chunk in chunks:
            for module in chunk.modules():
                layer = getattr(module, "layer_number", None)
                mlp = getattr(module, "mlp", None)
                router = getattr(mlp, "router", None)
                if layer is not None and router is not None:
                    routers[int(layer) - 1] = router
                    config = router.config
        if config is None:
            return None
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
