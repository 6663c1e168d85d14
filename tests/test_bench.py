"""python -m pytest -q tests/test_bench.py

bench.py end to end on the tiny preset (the JSON's structure, which VAT form each row measures, the ratios, the
agreement checks; subprocesses, marked slow) and memory.py's estimate."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import run as runner
from attention_distill import VATSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_tiny_json(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: the step count is small and a busy 2-core machine makes OpenMP barriers slow
    cmd = [sys.executable, "bench.py", "--preset=tiny", "--steps=2", "--warmup=1", "--threads=1", f"--json_out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())

    assert res["preset"] == "tiny" and res["shape"]["seq_len"] == 16 + 64 + 48 and res["shape"]["batch"] == 4
    assert res["shape"]["image_tokens"] == 64 and res["shape"]["supervised"] > 0
    # which VAT form each row passes to the loss: `ours` is training's default (the paper's form), `ours_ref` and
    # `reference` the reference code's form, `novat` none
    paper = {k: runner.DEFAULTS[k] for k in ("vat_queries", "vat_pool", "vat_loss", "vat_layer_reduce", "matching")}
    assert paper["vat_queries"] == "all" and paper["vat_pool"] == "flat"
    R = res["results"]
    assert list(R) == ["ours", "novat", "ours_ref", "reference"]
    assert {k: R["ours"]["vat"][k] for k in paper} == paper
    for m in ("ours_ref", "reference"):
        assert {k: R[m]["vat"][k] for k in paper} == dict(paper, vat_queries="image", vat_pool="column")
    assert R["novat"]["vat"] is None

    # one agreement check per form, in float32, passed, and its numbers say why
    assert [c["mode"] for c in res["checks"]] == ["ours", "ours_ref"]
    for c in res["checks"]:
        assert c["vat"] == R[c["mode"]]["vat"]
        assert c["dtype"] == "float32" and c["decisive"] and c["passed"] is True and c["rtol"] == 1e-5
        for k in ("lm", "kd", "vat"):
            v = c["losses"][k]
            assert v["rel_diff"] <= c["rtol"] and abs(v["ours"] - v["reference"]) == v["abs_diff"]
        assert c["losses"]["vat"]["reference"] > 1e-3  # a non-vacuous VAT loss is compared

    # the VAT loss each row measured is the one training computes with that row's settings: rebuild the bench's
    # models and batch here and ask TeacherStudent directly (weights do not change: no optimizer step)
    p, dev = bench.PRESETS["tiny"], torch.device("cpu")
    ts = bench.build(p, dev)
    batch = bench.make_batch(p, ts.student.num_image_tokens, dev)
    expected = {}
    for m, form in (("ours", VATSettings.from_config(runner.DEFAULTS)),
                    ("ours_ref", VATSettings(vat_queries="image", vat_pool="column"))):
        ts.vat_settings = form
        with torch.no_grad():
            expected[m] = float(ts(batch)["vat"])
        assert R[m]["losses"]["vat"] == pytest.approx(expected[m], rel=1e-5)
    assert R["reference"]["losses"]["vat"] == pytest.approx(expected["ours_ref"], rel=1e-5)
    assert abs(expected["ours"] - expected["ours_ref"]) > 0.1 * expected["ours_ref"]  # the two forms tell apart

    for m, r in R.items():
        assert len(r["step_s_all"]) == 2 and r["step_s"] > 0
        assert r["tokens_per_s"] == 4 * 128 / r["step_s"]
        assert 0 < r["cpu_s"]  # CPU: the process's own CPU time too
        assert r["mfu"] is None  # CPU: no MFU
        assert r["saved_mib"] > 0  # autograd's saved activations, counted on any device
        if res["memory_method"] is not None:
            assert r["peak_mem_mib"] > 0 and r["step_mem_mib"] > 0
        assert all(isinstance(r["losses"][k], float) for k in ("lm", "kd", "vat"))
    assert R["novat"]["losses"]["vat"] == 0
    assert set(res["ratios"]) == {"ours/novat", "ours_ref/reference", "ours_ref/novat"}
    for pair, ratio in res["ratios"].items():
        a, b = pair.split("/")
        assert ratio["step_s"] == R[a]["step_s"] / R[b]["step_s"] and ratio["cpu_s"] == R[a]["cpu_s"] / R[b]["cpu_s"]
        (a1, a2), (b1, b2) = R[a]["step_s_all"], R[b]["step_s_all"]
        assert ratio["step_s_paired"] == pytest.approx((a1 / b1 + a2 / b2) / 2)  # the median of two
        if res["memory_method"] is not None:
            assert ratio["step_mem_mib"] == R[a]["step_mem_mib"] / R[b]["step_mem_mib"]
    assert "ours/novat: time" in proc.stdout and "ours_ref/reference: time" in proc.stdout
    assert "check ours = output_attentions, VAT all/flat, in float32 (rtol 1e-05) passed" in proc.stdout
    assert "check ours_ref = output_attentions, VAT image/column, in float32 (rtol 1e-05) passed" in proc.stdout


@pytest.mark.slow
def test_bench_rejects_unknown_mode():
    cmd = [sys.executable, "bench.py", "--modes=ours,fast"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "bad modes 'ours,fast': a comma-separated subset of ours,novat,ours_ref,reference" in proc.stderr


def test_memory_estimate_counts_the_models_parameters_and_shards_them():
    import memory
    from model import VLM, VLMConfig
    p = bench.PRESETS["tiny"]
    c = memory.param_counts(p, rank=8)
    # against the real models built from the same configs
    torch.manual_seed(0)
    lm = lambda kw: dict(model_type="qwen2", vocab_size=p["vocab"], tie_word_embeddings=False, **kw)  # noqa: E731
    t = VLM(VLMConfig(vision=dict(bench.VISION, **p["vision"]), llm=lm(p["teacher"]), image_token_id=0))
    n = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    assert c["t_layers"] + c["t_lm_rest"] == n(t.llm) and c["t_tower"] == n(t.vision_tower)
    assert c["post_connector"] == 256 * 128 + 128  # Linear(d_teacher 256 -> d_student 128)
    d, f = 128, 256  # student: q, k, v, o (GQA: k, v 64 wide), gate, up (d -> f), down (f -> d), 4 layers
    assert c["lora"] == 8 * 4 * ((d + d) + 2 * (d + 64) + (d + d) + 2 * (d + f) + (f + d))
    ddp, fsdp = (memory.memory_estimate(p, s, ckpt=True, world=4) for s in ("ddp", "fsdp"))
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 4)  # AdamW's states sharded over 4 GPUs
    assert ddp["optimizer"] == pytest.approx(8 * (c["s_layers"] + c["s_lm_rest"] + c["post_connector"]) / 2**30)
    assert ddp["total"] == pytest.approx(sum(v for k, v in ddp.items() if k != "total"))
    lora = memory.memory_estimate(p, "ddp_lora", ckpt=True, rank=8)
    assert lora["grads"] == pytest.approx(4 * (c["lora"] + c["post_connector"]) / 2**30)
    full = memory.memory_estimate(p, "ddp", ckpt=False)
    assert full["activations"] > ddp["activations"]  # checkpointing keeps one layer input, not every activation


def test_startup_estimate_counts_what_each_rank_loads_before_the_first_step():
    """DDP: the step's weights less autocast's bf16 copy, the teacher and AdamW's states (a resume loads them). FSDP:
    the shards (student, AdamW's states and the zero gradients of their initialisation, the teacher's layers), the
    teacher's unsharded rest and one float32 embedding in flight; below the step's total."""
    import memory
    p = bench.PRESETS["tiny"]
    c = memory.param_counts(p)
    train = c["s_layers"] + c["s_lm_rest"] + c["post_connector"]
    ddp = memory.memory_estimate(p, "ddp", ckpt=True)
    assert memory.startup_estimate(p, "ddp") == pytest.approx(
        ddp["weights"] - 2 * train / 2**30 + ddp["teacher"] + ddp["optimizer"])
    s_all = c["s_layers"] + c["s_lm_rest"] + c["s_tower"] + c["s_connectors"]
    two, four = (memory.startup_estimate(p, "fsdp", world=w) for w in (2, 4))
    assert two - four == pytest.approx((4 * s_all + 12 * train + 2 * c["t_layers"]) / 4 / 2**30)
    assert four < memory.memory_estimate(p, "fsdp", ckpt=True, world=4)["total"]
