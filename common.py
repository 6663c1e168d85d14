"""
What every script needs before it does its own job: print0 (rank 0 speaks), the process group (compute_init /
compute_cleanup; nccl on GPU, gloo on CPU), and the choice of device and dtype (resolve_dtype, cast_weights).
"""
import datetime
import os
import socket

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def why(error):
    """An exception in a few words for a one-line message: its first line, else its type."""
    return (str(error).splitlines() or [""])[0] or type(error).__name__


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# processes

_OWN_GROUP = False  # whether compute_init created the process group (and compute_cleanup may destroy it)


def compute_init(single_group=False):
    """Plain python: one process (with single_group, in a process group of its own, which FSDP needs).
    torchrun: a process group (nccl on GPU, gloo on CPU). A program that already initialised one (a test running
    several trainings in one launch) keeps it: the caller then neither creates nor destroys it.
    Returns (distributed, rank, world size, device)."""
    global _OWN_GROUP
    distributed = "RANK" in os.environ or single_group or (dist.is_initialized() and not _OWN_GROUP)
    if distributed and not dist.is_initialized():
        _OWN_GROUP = True
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            # a long timeout: the other ranks wait in a barrier while rank 0 writes a multi-GB checkpoint
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return distributed, rank, world, device


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compute_cleanup():
    """After a successful run only (a rank that died leaves the others in a collective; torchrun ends them). The
    barrier first: a rank that tears down its process group while another is still in the last collective can hang.
    A DDP wrapper holds the process group too: drop it before calling this."""
    global _OWN_GROUP
    if dist.is_initialized():
        dist.barrier()
        if _OWN_GROUP:
            dist.destroy_process_group()
            _OWN_GROUP = False


# -----------------------------------------------------------------------------
# device and dtype


def pick_device(name="auto"):
    """A script's `device` setting: "auto" is the GPU when there is one, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def resolve_dtype(name, device, allowed=("auto", "float32", "bfloat16")):
    """A script's `dtype` setting as a torch dtype: one of `allowed`, where "auto" is bfloat16 on CUDA and float32
    elsewhere. Anything else is an error that lists the choices."""
    if name not in allowed:
        raise ValueError(f"dtype={name!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cast_weights(module, dtype):
    """Cast the parameters (and saved buffers) to `dtype`, in place. Buffers a model computes from its config stay as
    built: rotary frequencies in bf16 would put the angle of position 1000 off by up to ~2 radians (module.to(dtype)
    casts those too)."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point() and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to(dtype)
    return module
