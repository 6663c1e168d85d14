"""
    python -m pytest -q tests/test_bench.py

bench.py end to end on the tiny preset: the JSON's structure, which VAT form each row measures, the ratios, the
agreement checks (subprocesses, marked slow). memory.py's estimate is tested in tests/test_memory.py.
"""
import json
import subprocess
import sys

import pytest
import torch

import bench
import run as runner
from attention_distill import VATSettings
from conftest import ROOT


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
