"""FSDP2 (fully_shard) on CPU with gloo, two processes: the same training as DDP (which equals one process with
gradient accumulation), with and without LoRA, and an exact resume."""
import os

import pytest
import torch

from conftest import LAYERS, args, run, torchrun, weights

STEPS = dict(batch_size=2, max_steps=3, log_interval=1, eval_interval=0, save_interval=100, max_length=96, lr=1e-3,
             warmup_frac=0.0, **LAYERS)


@pytest.fixture(scope="module")
def fsdp_runs(hf):
    root = hf["root"] / "fsdp"
    common = dict(init_from=hf["dpt"], teacher=hf["teacher"], data=hf["data"], **STEPS)
    lora = dict(lora_rank=4, lora_dropout=0.0)  # LoRA's A starts random: every rank must draw the same
    runs = {}
    for name, kw in [("single", {}), ("single_lora", lora)]:  # DDP's equal (tests/test_real_runs.py)
        runs[name] = str(root / name)
        run("dft", out_dir=runs[name], **{**common, **kw, "batch_size": 1, "grad_accum": 2})
    for name, kw in [("fsdp", {}), ("cut", dict(stop_after=2)), ("resumed", {}), ("fsdp_lora", lora)]:
        runs[name] = str(root / ("cut" if name == "resumed" else name))
        r = torchrun("train_dft.py", args({**common, **kw, "batch_size": 1, "fsdp": True, "out_dir": runs[name]}))
        assert r.returncode == 0, (name, r.stderr[-3000:])
    return runs


def log(path):
    return torch.load(os.path.join(path, "train_state.pt"), weights_only=False)["log"]


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_trains_as_ddp_does(fsdp_runs, lora):
    """Same samples, same steps: the weights agree to float32 reduction-order noise (tolerance 1e-6)."""
    a, b = (weights(fsdp_runs[k + ("_lora" if lora else "")]) for k in ("single", "fsdp"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    for x, y in zip(log(fsdp_runs["single"]), log(fsdp_runs["fsdp"])):
        assert y["total"] == pytest.approx(x["total"], rel=1e-6) and y["grad_norm"] == pytest.approx(x["grad_norm"])


def test_fsdp_resume_is_exact(fsdp_runs):
    """Stopped after 2 steps and resumed (weights from the gathered checkpoint, optimizer state resharded)."""
    a, b = weights(fsdp_runs["fsdp"]), weights(fsdp_runs["cut"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(os.path.join(fsdp_runs[k], "train_state.pt"), weights_only=False) for k in ("fsdp", "cut"))
    assert sa["step"] == sb["step"] == 3
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"]), k
