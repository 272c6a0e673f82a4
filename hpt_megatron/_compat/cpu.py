"""Run Megatron-core on CPU with gloo.

Megatron-core 0.16 hard-codes CUDA in a handful of places: factory calls with ``device="cuda"`` or
``device=torch.cuda.current_device()``, ``.cuda()`` on tensors, the CUDA RNG tracker that forks the
random state around dropout and initialisation, ``torch.cuda.synchronize`` / streams in the DDP
buffers, and a CUDA tensor-type assert in gradient clipping. None of it needs a GPU to be correct;
it only names one. ``enable_cpu_mode()`` redirects those names to the CPU, explicitly (nothing is
patched on import), once per process, and only for the Megatron versions we have tested.

How:
- a ``TorchFunctionMode`` rewrites any CUDA ``device=`` argument (and ``Tensor.cuda()``) to CPU;
- ``Tensor.type()`` (no argument) names a CPU tensor's CUDA type, which Megatron's mixed-precision
  and distributed optimizers check their parameters against;
- ``torch.cuda.current_device``/``synchronize``/streams/RNG functions become CPU equivalents;
- Megatron's RNG state helpers use the CPU generator;
- gradient clipping uses a CPU implementation with the same semantics;
- the causal mask of the local attention's softmax is built on the CPU (recomputation rebuilds it
  inside backward, where the device mode does not reach);
- the distributed optimizer's checkpoint state around torch's Adam (a fresh optimizer's step,
  one step tensor per parameter after a load);
- the MoE router's gating GEMM takes its torch path (a TE-only name is defined as ``None``), and
  the alltoall dispatcher's split sizes become the numpy arrays it makes of CUDA tensors.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON = ("0.16.",)

_state: dict[str, Any] = {"enabled": False, "mode": None}
_lock = threading.Lock()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cuda_type_name(tensor: torch.Tensor) -> str:
    """``tensor.type()`` as a CUDA tensor of its dtype would give it: Megatron's mixed-precision
    and distributed optimizers sort parameters by ``param.type()`` against the names
    ``torch.cuda.{Float,Half,BFloat16}Tensor`` and refuse any other (``optimizer.py``
    ``Float16OptimizerWithFloat16Params.__init__``, ``distrib_optimizer.py``
    ``_build_model_and_main_param_groups``); on the CPU the same dtypes are ``torch.*Tensor``."""
    name = torch.Tensor.type(tensor)
    if tensor.device.type == "cpu" and name.startswith("torch.") and "cuda" not in name:
        return "torch.cuda." + name[len("torch.") :]
    return name


class _CudaToCpu(TorchFunctionMode):
    """Rewrite CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(args[0])
        if "device" in kwargs and (_is_cuda(kwargs["device"]) or isinstance(kwargs["device"], int)):
            kwargs = {**kwargs, "device": "cpu"}
        if (
            func in (torch.Tensor.to,)
            and args
            and len(args) > 1
            and (_is_cuda(args[1]) or isinstance(args[1], int) and not isinstance(args[1], bool))
        ):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullEvent:
    """Stands in for a ``torch.cuda.Event`` (the MoE dispatcher waits on one)."""

    def synchronize(self) -> None: ...
    def wait(self, *_: Any) -> None: ...
    def record(self, *_: Any) -> None: ...
    def query(self) -> bool:
        return True


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` (a class, so annotations like ``Stream | None`` work)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def wait_stream(self, *_: Any) -> None: ...
    def synchronize(self) -> None: ...
    def record_event(self, *_: Any) -> _NullEvent:
        return _NullEvent()


def _check_version() -> None:
    import megatron.core

    version = megatron.core.__version__
    if not version.startswith(SUPPORTED_MEGATRON):
        raise RuntimeError(
            f"hpt_megatron's CPU mode was written for megatron-core {SUPPORTED_MEGATRON}, "
            f"found {version}; check hpt_megatron/_compat/cpu.py against this version"
        )


def _patch_torch_cuda() -> None:
    # Set by name: these stand-ins do not have torch.cuda's signatures (current_device gives "cpu").
    stand_ins: dict[str, Any] = {
        "current_device": lambda: "cpu",  # used as a device= argument only
        "synchronize": lambda *a, **k: None,
        "default_stream": lambda *a, **k: _NullStream(),
        "current_stream": lambda *a, **k: _NullStream(),
        "Stream": _NullStream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # The RNG tracker seeds, reads and restores "the CUDA state": make that the CPU generator.
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        # torch.manual_seed calls it; the CPU generator is seeded already.
        "manual_seed_all": lambda seed: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "empty_cache": lambda: None,
    }
    for name, value in stand_ins.items():
        setattr(torch.cuda, name, value)


def _patch_megatron() -> None:
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for param in parameters:
                grad = getattr(param, attr, None)
                if grad is not None:
                    grad.detach().mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu

    # The MoE router's gating GEMM tests ``te_general_gemm is not None``, a name moe_utils only
    # defines when Transformer Engine imports: without TE it is a NameError, not the torch path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # The alltoall dispatcher moves its split sizes "to the CPU as numpy" only for CUDA tensors;
    # on the CPU they stay tensors, which all_to_all_single refuses as split sizes.
    from megatron.core.transformer.moe import token_dispatcher

    def move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu

    # Activation recomputation reruns the attention's softmax inside ``torch.autograd.backward``,
    # which the device mode does not reach (a TorchFunctionMode is off while it handles a call,
    # and backward is one call): the default causal mask's ``device="cuda"`` must name the CPU.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    def causal_mask_cpu(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    transformer_utils.get_default_causal_mask = causal_mask_cpu
    fused_softmax.get_default_causal_mask = causal_mask_cpu

    _patch_distributed_optimizer_state()


def _patch_distributed_optimizer_state() -> None:
    """Without Apex or TE the distributed optimizer wraps torch's Adam, whose ``step`` lives in
    each parameter's state; two places of Megatron 0.16's ``DistributedOptimizer`` get it wrong:

    - ``state_dict`` asserts there is exactly one step value; before the first step there is
      none, so a fresh optimizer cannot plan a checkpoint load (``sharded_state_dict(
      is_loading=True)`` calls ``state_dict`` first; the TE/Apex branch takes "no step yet" as
      None). An unstepped optimizer first gets the state torch's Adam creates on its first step
      (zero moments, step 0), which the load then overwrites.
    - ``load_state_dict`` sets every parameter's step to one shared tensor (torch's Adam then
      increments it once per parameter), and the ``dp_reshardable`` parameter state it loads
      next copies the *loading* optimizer's own step over it (``step`` is a
      ``LocalNonpersistentObject`` there: with TE/Apex the step lives in the param groups).
      After the load each parameter gets its own tensor holding the checkpoint's step, the one
      in the param groups.
    """
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    if distrib_optimizer.HAVE_APEX_OR_TE or getattr(cls.state_dict, "_hpt_cpu", False):
        return
    original_state_dict, original_load = cls.state_dict, cls.load_state_dict

    def state_dict(self: Any) -> Any:
        inner = self.optimizer
        if not inner.state and self.init_state_fn is not None:
            self.init_state_fn(inner, self.config)
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param]["step"] = torch.tensor(0.0)
        return original_state_dict(self)

    def load_state_dict(self: Any, state: Any) -> None:
        original_load(self, state)
        set_checkpoint_step(self.optimizer, state)

    state_dict._hpt_cpu = True  # type: ignore[attr-defined]
    cls.state_dict = state_dict
    cls.load_state_dict = load_state_dict


def set_checkpoint_step(inner: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Give each parameter of torch optimizer ``inner`` its own tensor holding the step of the
    distributed optimizer's state dict ``state`` (the one step of its param groups)."""
    (step,) = {group["step"] for group in state["optimizer"]["param_groups"]}
    for param_state in inner.state.values():
        param_state["step"] = torch.tensor(float(step))


def enable_cpu_mode() -> None:
    """Redirect Megatron-core's CUDA calls to the CPU for the rest of this process.

    Call once, before building models, when no GPU is present. Idempotent. The device mode is
    pushed for the calling thread; threads that run Megatron code must call it too.
    """
    with _lock:
        if torch.cuda.is_available():
            raise RuntimeError("enable_cpu_mode() is for machines without a GPU")
        if not _state["enabled"]:
            _check_version()
            _patch_torch_cuda()
            _patch_megatron()
            _state["enabled"] = True
        local = _state.setdefault("threads", threading.local())
        if not getattr(local, "mode", None):
            local.mode = _CudaToCpu()
            local.mode.__enter__()


def cpu_mode_enabled() -> bool:
    return bool(_state["enabled"])
