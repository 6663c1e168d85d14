"""
Real-model paths, on tiny Hugging Face checkpoints saved here as real ones come (bf16 LMs with byte-level BPE
tokenizers and no pad token, SigLIP and CLIP towers) and LLaVA files with text-only and broken rows: DDP, precision,
the start-up checks, resume rules, compile and signals.
"""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import trainer
from conftest import bpe_tokenizer, save_lm, save_tower, write_llava
from model import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = dict(student_layers=[0, 1], teacher_layers=[1, 2, 3])


def args(d):
    return [f"--{k}={v}" for k, v in d.items()]


def run(stage, **kw):
    defaults = {"sft": dict(stage="sft"), "dpt": dict(stage="dpt", kd_weight=1.0, taf=True),
                "dft": dict(stage="dft", kd_weight=1.0, vat_weight=1.0)}[stage]
    base = dict(batch_size=2, max_steps=2, log_interval=1, eval_interval=0, save_interval=100, lr=1e-3,
                max_length=96, warmup_frac=0.0)
    return trainer.main(defaults, args({**base, **kw}))


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def free_port():
    with socket.socket() as s:  # a fixed port hangs when two suites run at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_order(n, seed, steps, world):
    """The dataset index each (step, rank) micro-batch of size 1 reads (trainer.BatchSampler over the train split,
    which with eval_interval=0 is the whole file in the fixed permutation of seed 1234)."""
    split = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()
    sampler = iter(trainer.BatchSampler(n, 1, seed, 0, 1))
    return [[split[next(sampler)[0]] for _ in range(world)] for _ in range(steps)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Backbones, a teacher (2 SFT steps from backbones; its LM's embedding padded 48 rows past the tokenizer, as
    Qwen's is) and a DPT student with TAF (2 steps), all from bf16 checkpoints."""
    root = tmp_path_factory.mktemp("hf")
    tok = bpe_tokenizer()
    d = dict(root=root, siglip=save_tower(root / "siglip"), clip=save_tower(root / "clip", "clip"),
             teacher_lm=save_lm(root / "qwen2_t", tok, hidden=48, layers=4, pad_rows=48),
             student_lm=save_lm(root / "qwen2_s", tok, hidden=32, layers=2, seed=1),
             data=write_llava(root / "data.json", ["image"] * 6 + ["text"] * 2))
    d["teacher"], d["dpt"] = str(root / "teacher"), str(root / "dpt")
    run("sft", init_from="backbones", vision_model=d["siglip"], llm_model=d["teacher_lm"], data=d["data"],
        out_dir=d["teacher"])
    run("dpt", init_from="backbones", vision_model=d["siglip"], llm_model=d["student_lm"], teacher=d["teacher"],
        data=d["data"], out_dir=d["dpt"], **LAYERS)
    return d


# -- 1-3: DDP with a text-only and an all-dropped micro-batch ------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_runs(hf):
    """DFT for 3 steps of batch 1: under torchrun with 2 processes, and in one process with grad_accum=2 (the same
    samples in the same groups). Rank 0's first micro-batch is text-only (no gradient reaches the image adapter
    there), rank 1's second one has only a missing image (dropped: nothing to run)."""
    root = hf["root"]
    order = data_order(8, 0, 3, 2)
    kinds = ["image"] * 8
    kinds[order[0][0]], kinds[order[1][1]] = "text", "missing"
    data = write_llava(root / "ddp" / "data.json", kinds, seed=1)
    common = dict(init_from=hf["dpt"], teacher=hf["teacher"], data=data, batch_size=1, max_steps=3,
                  log_interval=1, eval_interval=0, save_interval=100, max_length=96, lr=1e-3, warmup_frac=0.0, **LAYERS)
    single = str(root / "ddp" / "single")
    run("dft", out_dir=single, grad_accum=2, **common)
    out = str(root / "ddp" / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "train_dft.py"), *args({**common, "out_dir": out})]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=240)  # a hang fails here instead of blocking the suite
    return dict(single=single, ddp=out, result=r, kinds=kinds, order=order)


def test_ddp_survives_a_text_only_micro_batch_and_matches_one_process(ddp_runs):
    r = ddp_runs["result"]
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(ddp_runs["single"]), weights(ddp_runs["ddp"])
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert not torch.equal(a["post_connector.weight"], b["post_connector.weight"] * 0)


def test_ddp_rank_with_an_all_dropped_micro_batch_still_joins(ddp_runs):
    r = ddp_runs["result"]
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(os.path.join(ddp_runs["ddp"], "train_state.pt"), weights_only=False)
    assert state["step"] == 3
    assert "dropped samples {'missing_image': 1}" in r.stdout


def test_logged_losses_are_the_mean_over_all_ranks(ddp_runs):
    def log(path):
        return torch.load(os.path.join(path, "train_state.pt"), weights_only=False)["log"]
    single, ddp = log(ddp_runs["single"]), log(ddp_runs["ddp"])
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for s, d in zip(single, ddp):
        for k in ("lm", "kd", "vat", "total"):
            assert d[k] == pytest.approx(s[k], rel=1e-5, abs=1e-7), (d["step"], k)
    # step 1: rank 1 has the only image sample, so a rank-0-only log would show no VAT at all
    assert ddp[0]["vat"] > 0 and ddp[0]["lm"] != pytest.approx(ddp[1]["lm"])
