"""enable_cpu_mode(): version guard, idempotence, CUDA -> CPU redirection, Megatron's RNG tracker,
the CPU gradient clip, CUDA type names for the mixed-precision optimizers, the causal mask
rebuilt in backward, and the distributed optimizer's step around torch's Adam.

The mode patches torch.cuda and Megatron process-wide, so every check runs in one fresh Python
process (importing Megatron costs seconds); it prints a JSON report the tests below read.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU mode is for machines without a GPU"
)

SCRIPT = textwrap.dedent(
    r"""
    import json, os, socket
    import torch
    import torch.distributed as dist
    import megatron.core
    from hpt_megatron._compat import cpu

    report = {}

    def fails(fn):
        try:
            fn()
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return None

    # Importing the module patches nothing.
    report["before_empty_cuda"] = fails(lambda: torch.empty(2, device="cuda"))
    report["before_current_device"] = fails(torch.cuda.current_device)

    # Version guard: refuse, and leave the process unpatched.
    real_version = megatron.core.__version__
    megatron.core.__version__ = "0.17.0"
    report["version_error"] = fails(cpu.enable_cpu_mode)
    report["enabled_after_refusal"] = cpu.cpu_mode_enabled()
    report["modes_after_refusal"] = torch._C._len_torch_function_stack()
    megatron.core.__version__ = real_version

    cpu.enable_cpu_mode()
    modes_once = torch._C._len_torch_function_stack()
    current_device = torch.cuda.current_device
    cpu.enable_cpu_mode()
    report["idempotent"] = (
        torch._C._len_torch_function_stack() == modes_once == 1
        and torch.cuda.current_device is current_device
        and cpu.cpu_mode_enabled()
    )

    report["devices"] = {
        "empty_cuda": torch.empty(2, device="cuda").device.type,
        "zeros_cuda0": torch.zeros(2, device=torch.device("cuda", 0)).device.type,
        "tensor_cuda": torch.tensor([1.0], device="cuda:0").device.type,
        "int_device": torch.ones(2, device=0).device.type,
        "current_device_as_device": torch.empty(1, device=torch.cuda.current_device()).device.type,
        "dot_cuda": torch.ones(2).cuda().device.type,
        "to_cuda": torch.ones(2).to("cuda").device.type,
        "to_device_kw": torch.ones(2).to(device="cuda").device.type,
        "to_dtype_still_works": str(torch.ones(2).to(torch.float64).dtype),
    }
    x = torch.arange(3.0)
    report["cuda_keeps_values"] = torch.equal(x.cuda(), x)
    def streams():
        torch.cuda.synchronize()
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())

    report["sync_error"] = fails(streams)

    # Megatron's RNG tracker: forks are reproducible, advance, and leave the default stream alone.
    from megatron.core.tensor_parallel import random as mrandom

    def seed(tp_rank=0):
        mrandom.model_parallel_cuda_manual_seed(123, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        return mrandom.get_cuda_rng_tracker()

    tracker = seed()
    default_after_seed = torch.rand(4)
    tracker = seed()
    state = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
        dropped = torch.nn.functional.dropout(torch.ones(64), p=0.5)
    report["fork_restores_default"] = torch.equal(state, torch.get_rng_state())
    with tracker.fork():
        second = torch.rand(4)
    tracker = seed()
    with tracker.fork():
        again = torch.rand(4)
        dropped_again = torch.nn.functional.dropout(torch.ones(64), p=0.5)
    tracker = seed(tp_rank=1)
    with tracker.fork():
        other_rank = torch.rand(4)
    report["rng"] = {
        "default_seeded": torch.equal(
            default_after_seed, torch.rand(4, generator=torch.Generator().manual_seed(123))
        ),
        "reproducible": torch.equal(first, again) and torch.equal(dropped, dropped_again),
        "advances": not torch.equal(first, second),
        "tp_ranks_differ": not torch.equal(first, other_rank),
        "fork_differs_from_default": not torch.equal(first, default_after_seed),
        "dropout_dropped": int((dropped == 0).sum()),
    }

    # Gradient clipping and the gradient norm, against torch.nn.utils.clip_grad_norm_.
    from megatron.core.optimizer import clip_grads, optimizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    gen = torch.Generator().manual_seed(0)

    def params(decoupled=False):
        out = []
        for shape in [(5, 3), (7,), (2, 2, 2)]:
            p = torch.nn.Parameter(torch.randn(shape, generator=gen))
            g = torch.randn(shape, generator=gen) * 3
            if decoupled:
                p.decoupled_grad = g
            else:
                p.grad = g
            out.append(p)
        return out

    report["clip"] = {}
    clip_fn = clip_grads.clip_grad_by_total_norm_fp32
    report["clip_is_patched"] = clip_fn is optimizer.clip_grad_by_total_norm_fp32
    cases = [("clipped", 1.5, False), ("under_limit", 1e3, False), ("decoupled", 1.5, True)]
    for name, max_norm, decoupled in cases:
        ps = params(decoupled)
        attr = "decoupled_grad" if decoupled else "grad"
        grads = [getattr(p, attr) for p in ps]
        originals = [g.clone() for g in grads]
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))
        total = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=dist.group.WORLD)
        clip_grads.clip_grad_by_total_norm_fp32(ps, max_norm, total, use_decoupled_grad=decoupled)
        got = [getattr(p, attr) for p in ps]
        report["clip"][name] = {
            "norm_rel_err": abs(total - ref_norm) / ref_norm,
            "ref_norm": ref_norm,
            "max_grad_err": max(float((g - r.grad).abs().max()) for g, r in zip(got, ref)),
            "unchanged": all(torch.equal(g, o) for g, o in zip(got, originals)),
            "clipped_norm": float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in got]))),
        }
    dist.destroy_process_group()

    # Megatron's optimizers sort parameters by Tensor.type() against CUDA type names.
    half = torch.ones(2, dtype=torch.float16)
    report["types"] = {
        "bf16": torch.ones(2, dtype=torch.bfloat16).type(),
        "fp32": torch.nn.Parameter(torch.ones(2)).type(),
        "fp16": half.type(),
        "conversion": half.type(torch.float64).dtype == torch.float64,
    }

    # The causal mask is rebuilt inside backward (recomputation), out of the device mode's reach.
    from megatron.core.fusions import fused_softmax

    class MaskInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad + fused_softmax.get_default_causal_mask(3).float().sum()

    x = torch.zeros(2, requires_grad=True)
    report["mask_in_backward"] = fails(lambda: MaskInBackward.apply(x).sum().backward())
    report["mask"] = fused_softmax.get_default_causal_mask(3).int().tolist()

    # The distributed optimizer around torch's Adam: a fresh one's state dict, a load's steps.
    from types import SimpleNamespace
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    adam = torch.optim.Adam(params)

    def init_state_fn(opt, config=None):
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["exp_avg"] = torch.zeros_like(p)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)

    fresh = SimpleNamespace(optimizer=adam, init_state_fn=init_state_fn, config=None)
    fresh.grad_scaler = None
    fresh_sd = DistributedOptimizer.state_dict(fresh)
    report["fresh_steps"] = [g["step"] for g in fresh_sd["optimizer"]["param_groups"]]
    report["fresh_moments_zero"] = all(
        float(s[k].abs().sum()) == 0 for s in adam.state.values() for k in ("exp_avg", "exp_avg_sq")
    )
    shared = torch.tensor(0.0)
    for s in adam.state.values():
        s["step"] = shared  # as Megatron's load leaves it
    cpu.set_checkpoint_step(adam, {"optimizer": {"param_groups": [{"step": 7}]}})
    steps = [s["step"] for s in adam.state.values()]
    report["loaded_steps"] = [float(t) for t in steps]
    report["steps_distinct"] = steps[0] is not steps[1] and steps[0] is not shared
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("REPORT ") :])


def test_nothing_is_patched_on_import(report):
    assert report["before_empty_cuda"] is not None
    assert report["before_current_device"] is not None


def test_unsupported_megatron_version_is_refused_clearly(report):
    msg = report["version_error"]
    assert msg.startswith("RuntimeError") and "0.17.0" in msg and "0.16." in msg
    assert "_compat/cpu.py" in msg
    assert report["enabled_after_refusal"] is False and report["modes_after_refusal"] == 0


def test_enable_is_idempotent(report):
    assert report["idempotent"] is True


def test_cuda_devices_are_redirected_to_cpu(report):
    devices = report["devices"]
    assert devices.pop("to_dtype_still_works") == "torch.float64"
    assert devices == dict.fromkeys(devices, "cpu")
    assert len(devices) == 8
    assert report["cuda_keeps_values"] is True
    assert report["sync_error"] is None


def test_megatron_rng_tracker_fork(report):
    assert report["fork_restores_default"] is True
    rng = report["rng"]
    assert 10 < rng.pop("dropout_dropped") < 54
    assert rng == dict.fromkeys(rng, True)


@pytest.mark.parametrize("case", ["clipped", "decoupled"])
def test_clip_scales_like_torch(report, case):
    clip = report["clip"][case]
    assert clip["ref_norm"] > 1.5 and clip["unchanged"] is False
    assert clip["norm_rel_err"] < 1e-6
    assert clip["max_grad_err"] < 1e-6
    assert abs(clip["clipped_norm"] - 1.5) < 1e-4
    assert report["clip_is_patched"] is True


def test_clip_leaves_grads_under_the_limit(report):
    clip = report["clip"]["under_limit"]
    assert clip["ref_norm"] < 1e3 and clip["unchanged"] is True and clip["max_grad_err"] == 0.0
    assert clip["norm_rel_err"] < 1e-6


def test_tensor_type_names_the_cuda_type(report):
    types = report["types"]
    assert types["bf16"] == "torch.cuda.BFloat16Tensor"
    assert types["fp32"] == "torch.cuda.FloatTensor"
    assert types["fp16"] == "torch.cuda.HalfTensor"
    assert types["conversion"] is True


def test_causal_mask_is_built_on_cpu_inside_backward(report):
    assert report["mask_in_backward"] is None
    assert report["mask"] == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_distributed_optimizer_step_around_torch_adam(report):
    assert report["fresh_steps"] == [0.0]
    assert report["fresh_moments_zero"] is True
    assert report["loaded_steps"] == [7.0, 7.0]
    assert report["steps_distinct"] is True
