"""
    python -m pytest -q tests/test_parallel.py

Several processes on CPU with gloo (parallel.py under torchrun, two processes; marked slow): DDP against one process
with gradient accumulation (a text-only and an all-dropped micro-batch, the logged losses), FSDP2 (fully_shard)
against DDP with and without LoRA and an exact resume, every rank joining every collective whatever its micro-batch
holds, and FSDP's start-up and resume memory.
"""
import importlib.util
import json
import os
import warnings

import pytest
import torch

from conftest import (LAYERS, bpe_tokenizer, data_order, run, save_lm, script_args, stage_train, torchrun,
                      training_defaults, weights, write_layout, write_llava)


# -- DDP with a text-only and an all-dropped micro-batch ------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_runs(hf):
    """DFT for 3 steps of batch 1: under torchrun with 2 processes, and in one process with grad_accum=2 (the same
    samples in the same groups). Rank 0's first micro-batch is text-only (no gradient reaches the trainable connector
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
    r = torchrun("train_dft.py", script_args("dft", **common, out_dir=out))  # a hang fails at its timeout
    return dict(single=single, ddp=out, result=r, kinds=kinds, order=order)


@pytest.mark.slow
def test_ddp_survives_a_text_only_micro_batch_and_matches_one_process(ddp_runs):
    r = ddp_runs["result"]
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(ddp_runs["single"]), weights(ddp_runs["ddp"])
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert not torch.equal(a["post_connector.weight"], b["post_connector.weight"] * 0)


@pytest.mark.slow
def test_ddp_rank_with_an_all_dropped_micro_batch_still_joins(ddp_runs):
    r = ddp_runs["result"]
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(os.path.join(ddp_runs["ddp"], "train_state.pt"), weights_only=False)
    assert state["step"] == 3
    assert "dropped samples {'missing_image': 1}" in r.stdout


@pytest.mark.slow
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


# -- FSDP against DDP --------------------------------------------------------------------------------------------------

STEPS = dict(batch_size=2, max_steps=3, log_interval=1, eval_interval=0, save_interval=100, max_length=96, lr=1e-3,
             warmup_frac=0.0, **LAYERS)


@pytest.fixture(scope="module")
def fsdp_runs(hf):
    root = hf["root"] / "fsdp"
    common = dict(init_from=hf["dpt"], teacher=hf["teacher"], data=hf["data"], **STEPS)
    lora = dict(lora_rank=4, lora_dropout=0.0)  # LoRA's A starts random: every rank must draw the same
    runs = {}
    for name, kw in [("single", {}), ("single_lora", lora)]:  # DDP's equal (the DDP tests above)
        runs[name] = str(root / name)
        run("dft", out_dir=runs[name], **{**common, **kw, "batch_size": 1, "grad_accum": 2})
    for name, kw in [("fsdp", {}), ("cut", dict(stop_after=2)), ("resumed", {}), ("fsdp_lora", lora)]:
        runs[name] = str(root / ("cut" if name == "resumed" else name))
        r = torchrun("train_dft.py", script_args("dft", **{**common, **kw, "batch_size": 1, "fsdp": True,
                                                            "out_dir": runs[name]}))
        if r.returncode != 0 and "SIGABRT" in r.stderr:
            # Known, not yet explained: about one FSDP launch in seven on this CPU has aborted (a gloo process
            # killed by SIGABRT, no Python traceback). Rerunning resumes or finishes the same run; a second abort
            # fails the test. The warning keeps the first one's log for whoever investigates.
            warnings.warn(f"FSDP run {name} aborted once (SIGABRT), rerun:\n{r.stderr[-3000:]}")
            r = torchrun("train_dft.py", script_args("dft", **{**common, **kw, "batch_size": 1, "fsdp": True,
                                                                "out_dir": runs[name]}))
        assert r.returncode == 0, (name, r.stderr[-3000:])
    return runs


def log(path):
    return torch.load(os.path.join(path, "train_state.pt"), weights_only=False)["log"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_trains_as_ddp_does(fsdp_runs, lora):
    """Same samples, same steps: the weights agree to float32 reduction-order noise (tolerance 1e-6)."""
    a, b = (weights(fsdp_runs[k + ("_lora" if lora else "")]) for k in ("single", "fsdp"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    for x, y in zip(log(fsdp_runs["single"]), log(fsdp_runs["fsdp"])):
        assert y["total"] == pytest.approx(x["total"], rel=1e-6) and y["grad_norm"] == pytest.approx(x["grad_norm"])


@pytest.mark.slow
def test_fsdp_resume_is_exact(fsdp_runs):
    """Stopped after 2 steps and resumed (weights from the gathered checkpoint, optimizer state resharded)."""
    a, b = weights(fsdp_runs["fsdp"]), weights(fsdp_runs["cut"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(os.path.join(fsdp_runs[k], "train_state.pt"), weights_only=False) for k in ("fsdp", "cut"))
    assert sa["step"] == sb["step"] == 3
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"]), k


# -- every rank joins every collective, whatever its micro-batch holds -------------------------------------------------

# one epoch of 4 steps, batch 1 on each of 2 ranks: at every step one rank reads a text-only sample, the other an image
ALTERNATING = [["image", "text"], ["text", "image"], ["image", "text"], ["text", "image"]]
DROPPED_STEP = [["image", "text"], ["text", "image"], ["missing", "missing"], ["text", "image"]]  # step 3: no sample
MOSTLY_DROPPED = [["missing", "missing"], ["image", "missing"], ["text", "image"], ["image", "text"]]
HAS_PEFT = importlib.util.find_spec("peft") is not None


def matrix_runs(hf, root):
    """name -> settings: the combinations of losses, TAF, LoRA, a frozen or trained LM, FSDP (and a sharded or whole
    teacher) and gradient checkpointing that decide which collectives a step runs."""
    data = write_layout(root / "alternating.json", ALTERNATING)
    base = dict(batch_size=1, max_steps=4, log_interval=1, eval_interval=0, save_interval=100, max_length=96, lr=1e-3,
                warmup_frac=0.0, data=data, teacher=hf["teacher"], **LAYERS)
    dpt = dict(base, stage="dpt", init_from="backbones", vision_model=hf["siglip"], llm_model=hf["student_lm"],
               kd_weight=1.0, taf=True)  # the LM frozen: only the post_connector trains
    dft = dict(base, stage="dft", init_from=hf["dpt"], kd_weight=1.0, vat_weight=1.0)
    sft = dict(base, stage="sft", init_from=hf["dpt"])
    fsdp, lora = dict(fsdp=True), dict(lora_rank=4)
    runs = {
        "fsdp_vat_only": dict(dft, **fsdp, kd_weight=0.0),  # the teacher runs for VAT alone
        "fsdp_vat_only_whole_teacher": dict(dft, **fsdp, kd_weight=0.0, fsdp_teacher=False),
        "fsdp_dpt": dict(dpt, **fsdp),
        "fsdp_dpt_vat_only_ckpt": dict(dpt, **fsdp, kd_weight=0.0, vat_weight=1.0, grad_ckpt=True),
        "fsdp_dpt_taf_only": dict(dpt, **fsdp, kd_weight=0.0),  # the teacher's connector, not its LM
        "fsdp_dpt_no_taf_lm_trains": dict(dpt, **fsdp, taf=False, train_llm=True, grad_ckpt=True),
        "fsdp_dft_frozen_lm_whole_teacher": dict(dft, **fsdp, train_llm=False, fsdp_teacher=False),
        "fsdp_sft_frozen_lm": dict(sft, **fsdp, train_llm=False),
        "fsdp_sft_ckpt": dict(sft, **fsdp, grad_ckpt=True),
        "ddp_dpt_vat_only": dict(dpt, kd_weight=0.0, vat_weight=1.0),
        "ddp_dpt_no_taf_ckpt": dict(dpt, taf=False, vat_weight=1.0, grad_ckpt=True),
    }
    if HAS_PEFT:
        runs.update({"fsdp_lora_ckpt": dict(dft, **fsdp, **lora, grad_ckpt=True),
                     "fsdp_lora_vat_only": dict(dft, **fsdp, **lora, kd_weight=0.0),
                     "ddp_lora_ckpt": dict(dft, **lora, grad_ckpt=True)})
    for name, cfg in runs.items():
        cfg["out_dir"] = str(root / name)
    return runs


@pytest.fixture(scope="module")
def launch(hf):
    """One torchrun launch of tests/torchrun_worker.py for every multi-process case below: the settings of each run,
    the names of the matrix's runs, each rank's results and the launch's output."""
    root = hf["root"] / "launch"
    root.mkdir()
    runs = matrix_runs(hf, root)
    matrix = list(runs)
    dft = dict(runs["fsdp_vat_only"], kd_weight=1.0)
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        runs[f"{name}_dropped_step"] = dict(dft, fsdp=fsdp, data=write_layout(root / "dropped_step.json", DROPPED_STEP))
    runs["mostly_dropped"] = dict(dft, fsdp=False, data=write_layout(root / "mostly.json", MOSTLY_DROPPED))
    # saved by two processes after 2 of 4 steps (resumed by one in a test below); saved by one, resumed by two here
    runs["cut_by_two"] = dict(dft, fsdp=False, stop_after=2)
    runs["cut_by_one"] = dict(dft, fsdp=False)
    for name in runs:
        runs[name]["out_dir"] = str(root / name)
    stage_train(training_defaults(**dict(runs["cut_by_one"], stop_after=2)))
    spec = root / "spec.json"
    spec.write_text(json.dumps({"timeout_s": 120, "runs": [dict(name=k, cfg=v) for k, v in runs.items()]}))
    r = torchrun("tests/torchrun_worker.py", [str(spec)], timeout=900)
    files = [root / f"spec.json.rank{i}.json" for i in range(2)]
    results = [json.loads(f.read_text()) if f.exists() else {} for f in files]
    return dict(runs=runs, matrix=matrix, results=results, output=r.stdout[-3000:] + r.stderr[-3000:])


def result(launch, name):
    """The run's result on each rank (its last log record or its error)."""
    got = [res.get(name) for res in launch["results"]]
    assert all(got), f"{name} did not finish on every rank:\n{launch['output']}"
    return got


@pytest.mark.slow
def test_every_rank_joins_every_collective_whatever_its_micro_batch_holds(launch):
    """At every step one rank's micro-batch is text-only and the other's has an image: the teacher, the decoder
    layers' gathers and the gradient reductions run on both ranks, for every combination in the matrix."""
    for name in launch["matrix"]:
        for res in result(launch, name):
            assert res.get("last", {}).get("step") == 4, (name, res)


@pytest.mark.slow
def test_a_step_without_a_sample_on_any_rank_is_skipped_on_every_rank(launch):
    """Step 3 reads a missing image on both ranks: both skip the update (and agree to), FSDP and DDP alike."""
    for name in ("fsdp_dropped_step", "ddp_dropped_step"):
        for res in result(launch, name):
            assert res["last"]["step"] == 4 and res["last"]["skipped_steps"] == 1, (name, res)


@pytest.mark.slow
def test_the_drop_breakdown_counts_every_rank(launch):
    """Rank 0 dropped 1 sample in the first two steps, rank 1 two: both stop with the same message, whose breakdown
    adds up to the 3 drops counted over the ranks."""
    data = launch["runs"]["mostly_dropped"]["data"]
    for res in result(launch, "mostly_dropped"):
        assert res["error"].startswith(f"{data}: 3 of 4 samples read cannot be used ({{'missing_image': 3}})"), res


@pytest.mark.slow
def test_resume_under_torchrun_on_another_number_of_processes_is_refused(launch):
    """Saved by one process, resumed by two: both ranks refuse at start-up (rank 1 has no saved RNG state or data
    position). Saved by two after 2 of 4 steps, resumed by one: refused (one process would re-read the samples rank 1
    used, with half the batch)."""
    one = launch["runs"]["cut_by_one"]["out_dir"]
    for res in result(launch, "cut_by_one"):
        assert res["error"] == (f"{one} was saved by a run on 1 process and this one has 2: resume it on 1 (plain "
                                "python, or torchrun --nproc_per_node=1), or choose another out_dir"), res
    two = launch["runs"]["cut_by_two"]
    assert [res["last"]["step"] for res in result(launch, "cut_by_two")] == [2, 2]
    with pytest.raises(ValueError, match=rf"^{two['out_dir']} was saved by a run on 2 processes and this one has 1: "
                                         r"resume it on 2 \(torchrun --nproc_per_node=2\)"):
        stage_train(training_defaults(**dict(two, stop_after=0)))


# -- FSDP's start-up and resume memory -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def memory(hf):
    """Per-rank peak resident memory (kB) before the first step of an FSDP DFT run, at start-up and at resume, on
    models whose weights dominate it: a teacher of 8 layers of width 384 (43 MB in float32), a student of 6 of width
    256 (15 MB; AdamW's states twice that). malloc returns freed tensors to the system at once, so that the peak counts
    what was alive."""
    root = hf["root"] / "memory"
    tok = bpe_tokenizer()
    teacher, student = str(root / "teacher"), save_lm(root / "student_lm", tok, hidden=256, layers=6, seed=1)
    run("sft", init_from="backbones", vision_model=hf["siglip"], llm_model=save_lm(root / "teacher_lm", tok, hidden=384,
        layers=8), data=hf["data"], out_dir=teacher, max_steps=1)
    cfg = dict(stage="dft", init_from="backbones", vision_model=hf["siglip"], llm_model=student, teacher=teacher,
               data=hf["data"], kd_weight=1.0, vat_weight=1.0, batch_size=1, max_steps=2, log_interval=1,
               eval_interval=0, max_length=96, fsdp=True, **LAYERS)
    runs = [dict(name="warm_up", cfg=dict(cfg, out_dir=str(root / "warm_up"), max_steps=1)),  # imports, first calls
            dict(name="start", cfg=dict(cfg, out_dir=str(root / "run"), stop_after=1)),
            dict(name="resume", cfg=dict(cfg, out_dir=str(root / "run")))]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    r = torchrun("tests/torchrun_worker.py", [str(spec)], timeout=600,
                 env=dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    peaks = [json.loads((root / f"spec.json.rank{i}.json").read_text()) for i in range(2)]
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    state = torch.load(root / "run" / "train_state.pt", weights_only=False)
    sizes = dict(teacher=nbytes(weights(teacher).values()), student=nbytes(weights(root / "run").values()),
                 optimizer=nbytes(v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"))
    return sizes, [{k: p[k]["startup_kb"] * 1024 for k in ("start", "resume")} for p in peaks]


@pytest.mark.slow
def test_fsdp_ranks_hold_their_shard_at_start_up_and_resume(memory):
    """Only rank 0 reads the checkpoints (on the CPU); every rank builds the models on the meta device, shards them
    and receives its shards tensor by tensor. Rank 1's peak before the first step is its half of the models, plus at
    resume its half of AdamW's states and of the gradients (torch initialises the optimizer state with a step on zero
    gradients before loading it), within 10 % of the models: not the whole models, nor the whole optimizer state. Rank 0
    holds at most one whole copy besides its shards."""
    sizes, peaks = memory
    models, student, optimizer = sizes["teacher"] + sizes["student"], sizes["student"], sizes["optimizer"]
    slack = 0.1 * models
    assert peaks[1]["start"] < models / 2 + slack, (sizes, peaks)
    assert peaks[1]["resume"] < (models + optimizer + student) / 2 + slack, (sizes, peaks)
    assert peaks[0]["start"] < models * 1.5 + slack, (sizes, peaks)
    assert peaks[0]["resume"] < (models + optimizer) * 1.5 + student / 2 + slack, (sizes, peaks)
