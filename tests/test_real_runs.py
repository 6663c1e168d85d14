"""
    python -m pytest -q tests/test_real_runs.py

Real-model paths, on tiny Hugging Face checkpoints saved here as real ones come (bf16 LMs with byte-level BPE
tokenizers and no pad token, SigLIP and CLIP towers) and LLaVA files with text-only and broken rows: DDP, precision,
the start-up checks, resume rules, compile and signals.
"""
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import run as runner
import run_log
import run_models
from conftest import (CORPUS, LAYERS, bpe_tokenizer, build_models, data_order, run, save_lm, save_tower,
                      script_args, torchrun, training_defaults, weights, write_layout, write_llava)
from model import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# -- precision -----------------------------------------------------------------------------------------------

def test_bf16_checkpoints_train_float32_masters_and_small_updates_survive(hf):
    """The backbones were saved in bf16 (transformers 5 builds models in their config's dtype). Five AdamW steps at
    lr 2e-4 move a norm weight by ~1e-3, less than bf16's spacing at 1.0 (2^-7): they survive only in float32."""
    out = str(hf["root"] / "bf16")
    run("sft", init_from="backbones", vision_model=hf["siglip"], llm_model=hf["student_lm"], data=hf["data"],
        out_dir=out, max_steps=5, lr=2e-4, dtype="bfloat16")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    norm = weights(out)["llm.model.norm.weight"]
    assert norm.dtype == torch.float32 and 0 < float((norm - 1).abs().max()) < 0.0078
    m = VLM.from_pretrained(out)
    assert m.config.llm["dtype"] == "float32" and next(m.llm.parameters()).dtype == torch.float32
    # as a bf16 run starts: the frozen teacher is cast to bf16, every weight of the student stays a float32 master
    ts = build_models(training_defaults(stage="dpt", init_from=hf["dpt"], teacher=hf["teacher"], kd_weight=1.0),
                      torch.bfloat16)
    assert {p.dtype for p in ts.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ts.student.parameters()} == {torch.float32}


def test_bf16_teacher_and_student_keep_equal_towers_for_taf(hf):
    """A teacher trained under bf16 autocast saves its frozen tower exactly as it came, so a student built from
    the same pretrained tower can take the teacher's connector (TAF) in the next stage."""
    teacher = str(hf["root"] / "bf16_teacher")
    run("sft", init_from="backbones", vision_model=hf["siglip"], llm_model=hf["teacher_lm"], data=hf["data"],
        out_dir=teacher, dtype="bfloat16", train_llm=False)
    tower = load_file(os.path.join(hf["siglip"], "model.safetensors"))
    saved = weights(teacher)
    assert all(torch.equal(saved["vision_tower." + k], v) for k, v in tower.items())
    run("dpt", init_from="backbones", vision_model=hf["siglip"], llm_model=hf["student_lm"], teacher=teacher,
        data=hf["data"], out_dir=str(hf["root"] / "bf16_dpt"), dtype="bfloat16", **LAYERS)


def test_float16_runs_with_a_grad_scaler_and_resumes_it(hf):
    """Under float16 the grad scaler's steps move the weights (finite) before and after a resume."""
    out = str(hf["root"] / "fp16")
    common = dict(init_from=hf["dpt"], data=hf["data"], out_dir=out, max_steps=3, dtype="float16")
    run("sft", stop_after=2, **common)
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=False)
    assert state["scaler"]["scale"] > 0 and state["step"] == 2
    start, saved = weights(hf["dpt"]), weights(out)
    last = run("sft", **common)
    moved = lambda a, b: sorted(k for k in a if not torch.equal(a[k], b[k]))  # noqa: E731
    end = weights(out)
    assert last["step"] == 3 and all(torch.isfinite(v).all() for v in end.values())
    assert "llm.lm_head.weight" in moved(saved, start) and "llm.lm_head.weight" in moved(end, saved)
    with pytest.raises(ValueError, match="dtype='half': use auto, float32, bfloat16 or float16"):
        run("sft", init_from=hf["dpt"], data=hf["data"], out_dir=str(hf["root"] / "half"), dtype="half")


# -- one tokenizer --------------------------------------------------------------------------------------------

def test_teacher_with_another_tokenizer_of_the_same_size_is_refused(hf):
    other = bpe_tokenizer(corpus=[text[::-1] for text in CORPUS])  # other merges, same size
    assert len(other) == len(bpe_tokenizer())
    lm = save_lm(hf["root"] / "other_lm", other, seed=3)
    with pytest.raises(ValueError, match=r"the teacher's tokenizer \(.*teacher\) and the student's \(.*other_lm\) differ"):
        run("dpt", init_from="backbones", vision_model=hf["siglip"], llm_model=lm, teacher=hf["teacher"],
            data=hf["data"], out_dir=str(hf["root"] / "other"), **LAYERS)


def test_padded_embeddings_on_either_side_distill_over_the_real_vocabulary(hf):
    """The fixture's teacher has 48 padding rows; here the student has 30 and the teacher none."""
    tok = bpe_tokenizer()
    t_lm = save_lm(hf["root"] / "t_nopad", tok, hidden=48, layers=4, seed=4)
    s_lm = save_lm(hf["root"] / "s_pad", tok, pad_rows=30, seed=5)
    t_out, s_out = str(hf["root"] / "t_nopad_vlm"), str(hf["root"] / "s_pad_dpt")
    run("sft", init_from="backbones", vision_model=hf["siglip"], llm_model=t_lm, data=hf["data"], out_dir=t_out)
    last = run("dpt", init_from="backbones", vision_model=hf["siglip"], llm_model=s_lm, teacher=t_out,
               data=hf["data"], out_dir=s_out, **LAYERS)
    assert last["kd"] > 0
    rows = {p: VLM.from_pretrained(p).llm.get_output_embeddings().out_features for p in (t_out, s_out)}
    assert rows == {t_out: len(tok) + 1, s_out: len(tok) + 30}  # <image> was added to the unpadded one


# -- CLIP --------------------------------------------------------------------------------------------------------

def test_clip_tower_llama_lm_end_to_end(hf):
    """A CLIP tower emits 4 patches + a CLS token; the "default" strategy drops CLS, so 4 visual tokens. The Llama
    LM's tokenizer has no pad token (eos pads) and adds BOS, which every training sequence starts with once."""
    llama = save_lm(hf["root"] / "llama", bpe_tokenizer(bos=True), arch="llama", seed=6)
    out = str(hf["root"] / "clip_llama")
    run("sft", init_from="backbones", vision_model=hf["clip"], llm_model=llama, data=hf["data"], out_dir=out)
    m = VLM.from_pretrained(out)
    assert m.config.vision_feature_select_strategy == "default" and m.num_image_tokens == 4
    assert m.tokenizer.pad_token == m.tokenizer.eos_token
    px = torch.randn(2, 3, 16, 16)
    hidden = m.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == 5 and torch.equal(m.vision_features(px), hidden[:, 1:])
    from data import LLaVADataset
    ds = LLaVADataset(hf["data"], None, m.tokenizer, m.image_processor, m.num_image_tokens, 96)
    ids = ds[0]["input_ids"].tolist()
    assert ids[0] == m.tokenizer.bos_token_id and ids.count(m.tokenizer.bos_token_id) == 1
    assert ids.count(m.image_token_id) == 4


def test_vision_feature_select_strategy_is_a_stage_setting(hf):
    """On SigLIP, "default" drops the first patch as the reference code does (3 of 4 tokens here)."""
    out = str(hf["root"] / "siglip_default")
    run("sft", init_from="backbones", vision_model=hf["siglip"], llm_model=hf["student_lm"], data=hf["data"],
        out_dir=out, vision_feature_select_strategy="default")
    assert VLM.from_pretrained(out).num_image_tokens == 3


# -- TAF needs the teacher's tower -------------------------------------------------------------------------------

@pytest.mark.parametrize("tower", ["clip", "siglip_other"])
def test_taf_on_another_tower_is_refused(hf, tower):
    path = hf["clip"] if tower == "clip" else save_tower(hf["root"] / "siglip_other", seed=7)
    with pytest.raises(ValueError, match="TAF needs the teacher's vision tower"):
        run("dpt", init_from="backbones", vision_model=path, llm_model=hf["student_lm"], teacher=hf["teacher"],
            data=hf["data"], out_dir=str(hf["root"] / f"taf_{tower}"), **LAYERS)
    # without TAF the same student distils (KD reads no connector of the teacher's); CLIP's 4 tokens match SigLIP's
    run("dpt", init_from="backbones", vision_model=path, llm_model=hf["student_lm"], teacher=hf["teacher"],
        data=hf["data"], out_dir=str(hf["root"] / f"notaf_{tower}"), taf=False, **LAYERS)


# -- a run that would train on nothing --------------------------------------------------------------------------

def test_wrong_image_folder_stops_before_training(hf, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError) as e:
        run("sft", init_from=hf["dpt"], data=hf["data"], image_folder=str(tmp_path / "nowhere"), out_dir=out)
    msg = str(e.value)
    assert msg.startswith(f"{hf['data']}: 6 of 8 samples read cannot be used ({{'missing_image': 6}})")
    assert str(tmp_path / "nowhere" / "images" / "0.png") in msg
    assert not os.path.exists(out)


# -- resume only the same run -----------------------------------------------------------------------------------

def test_rerun_into_a_finished_out_dir_with_other_settings_is_refused(hf, capsys):
    out = str(hf["root"] / "finished")
    common = dict(init_from=hf["dpt"], data=hf["data"], out_dir=out)
    run("sft", **common)
    run("sft", **common, log_interval=5)  # same run: nothing to do
    assert "already trained to step 2" in capsys.readouterr().out
    other = write_llava(hf["root"] / "other.json", ["image"] * 4)
    with pytest.raises(ValueError, match=rf"{out} holds a run with other settings \(data: '.*data.json' there, "
                                         r"'.*other.json' now; lr: 0.001 there, 0.0002 now\)"):
        run("sft", **dict(common, data=other), lr=2e-4)
    with pytest.raises(ValueError, match=r"stage: 'sft' there, 'dft' now"):
        run("dft", **common, teacher=hf["teacher"], **LAYERS)
    # eval_interval > 0 holds a validation slice out of the training data: another run
    with pytest.raises(ValueError, match=r"eval_interval: 0 there, 5 now"):
        run("sft", **common, eval_interval=5)


# -- compile what runs -----------------------------------------------------------------------------------------

def test_compile_compiles_the_decoders_training_calls(hf):
    import torch._dynamo
    from torch._dynamo.utils import counters
    from data import LLaVADataset, collate
    cfg = training_defaults(stage="dft", init_from=hf["dpt"], teacher=hf["teacher"], kd_weight=1.0,
               vat_weight=1.0, **LAYERS)
    ts = build_models(cfg)
    ds = LLaVADataset(hf["data"], None, ts.student.tokenizer, ts.student.image_processor, 4, 96)
    batch = collate([ds[i] for i in range(4)], ts.student.tokenizer.pad_token_id)
    want = ts(batch)
    torch._dynamo.reset()
    counters.clear()
    run_models.compile_models(ts, backend="eager")  # dynamo's tracing without code generation: fast
    got = ts(batch)
    assert counters["stats"]["unique_graphs"] >= 2  # the student's and the teacher's decoder really ran compiled
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    assert list(ts.student.state_dict()) == list(VLM.from_pretrained(hf["dpt"]).state_dict())  # keys unchanged


# -- the TAF shortcut survives the teacher's bf16 cast ------------------------------------------------------------

def test_taf_connector_shortcut_survives_the_bf16_cast(hf):
    """Under TAF the student's frozen connector is the teacher's: a step runs it once, for both models, also after
    the teacher was cast to bf16 as a bf16 run starts."""
    from data import LLaVADataset, collate
    cfg = training_defaults(stage="dft", init_from=hf["dpt"], teacher=hf["teacher"], kd_weight=1.0, **LAYERS)
    ts = build_models(cfg, torch.bfloat16)
    assert next(ts.teacher.connector.parameters()).dtype == torch.bfloat16
    ds = LLaVADataset(hf["data"], None, ts.student.tokenizer, ts.student.image_processor, 4, 96)
    batch = collate([ds[i] for i in range(4)], ts.student.tokenizer.pad_token_id)
    calls = []
    for who, m in (("student", ts.student.connector), ("teacher", ts.teacher.connector)):
        m.register_forward_hook(lambda *a, who=who: calls.append(who))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ts(batch)
    assert calls == ["teacher"] and torch.isfinite(out["total"])


# -- resume loads the optimizer state to the CPU ---------------------------------------------------------------

def test_resume_loads_train_state_to_cpu(hf, monkeypatch):
    out = str(hf["root"] / "maploc")
    run("sft", init_from=hf["dpt"], data=hf["data"], out_dir=out, max_steps=3, stop_after=1)
    seen, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real(*a, **k))
    run("sft", init_from=hf["dpt"], data=hf["data"], out_dir=out, max_steps=3)
    assert seen == ["cpu"]


def test_resume_on_another_number_of_processes_is_refused(hf):
    """The number of processes is part of a run: each rank's data position and RNG stream are saved. A checkpoint
    whose train_state.pt has no world size counts its RNG states; on the same number it still resumes.
    (tests/test_fsdp.py resumes real two-process checkpoints.)"""
    out = str(hf["root"] / "worlds")
    common = dict(init_from=hf["dpt"], data=hf["data"], out_dir=out, max_steps=3)
    run("sft", stop_after=1, **common)
    path = os.path.join(out, "train_state.pt")
    state = torch.load(path, weights_only=False)
    assert state["world"] == 1 and len(state["rng"]) == 1
    for world, rng in ((2, [state["rng"][0]] * 2), (None, state["rng"] * 2)):  # new, then old format
        torch.save({**{k: v for k, v in state.items() if k != "world"}, "rng": rng,
                    **({"world": world} if world else {})}, path)
        with pytest.raises(ValueError, match=rf"^{out} was saved by a run on 2 processes and this one has 1: resume "
                                             r"it on 2 \(torchrun --nproc_per_node=2\), or choose another out_dir$"):
            run("sft", **common)
    torch.save({k: v for k, v in state.items() if k != "world"}, path)  # old format, one process
    assert run("sft", **common)["step"] == 3


# -- what the data loader dropped and cut, counted once per sample ---------------------------------------------

def test_drops_and_truncations_are_counted_per_sample(hf, capsys):
    data = write_llava(hf["root"] / "drops" / "data.json", ["image", "missing", "image", "text"], seed=2)
    # 4 samples, batch 2, 6 steps: every sample is fetched three times; the missing one counts once
    run("sft", init_from=hf["dpt"], data=data, out_dir=str(hf["root"] / "drops" / "run"), max_steps=6,
        max_length=70)
    out = capsys.readouterr().out
    assert "data: dropped samples {'missing_image': 1}; 2 cut at max_length=70" in out


def test_the_drop_breakdown_adds_up_to_the_drops_counted(hf):
    """The in-training stop names as many drops by reason as it counts: 4 micro-batches of one sample in the first
    step, all with a missing image (every drop in the breakdown, not only the first ones kept as examples)."""
    data = write_layout(hf["root"] / "breakdown" / "data.json",
                        [["missing"]] * 4 + [["image"], ["text"], ["image"], ["text"]])
    with pytest.raises(ValueError) as e:
        run("sft", init_from=hf["dpt"], data=data, out_dir=str(hf["root"] / "breakdown" / "run"), batch_size=1,
            grad_accum=4, max_steps=2)
    assert str(e.value).startswith(f"{data}: 4 of 4 samples read cannot be used ({{'missing_image': 4}})")


# -- a step in which no sample could be used ------------------------------------------------------------------------

def test_a_step_without_any_sample_does_not_update_and_the_schedule_waits(hf):
    """Step 2 reads only a missing image: AdamW must not move the weights (its momentum would) nor count a step, and
    the LR schedule resumes where it stopped. Stopped after 2 steps, the run holds the weights of the one stopped
    after step 1; run to the end, its updates use the schedule's first three learning rates."""
    root = hf["root"] / "skip"
    data = write_layout(root / "data.json", [["image"], ["missing"], ["image"], ["text"]])
    common = dict(init_from=hf["dpt"], data=data, batch_size=1, max_steps=4, warmup_frac=0.5)
    run("sft", out_dir=str(root / "one"), stop_after=1, **common)
    run("sft", out_dir=str(root / "two"), stop_after=2, **common)
    a, b = weights(root / "one"), weights(root / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(root / k / "train_state.pt", weights_only=False) for k in ("one", "two"))
    adam_steps = [[v["step"] for v in s["optimizer"]["state"].values()] for s in (sa, sb)]
    assert adam_steps[0] == adam_steps[1]
    last = run("sft", out_dir=str(root / "two"), **common)  # resumed
    log = torch.load(root / "two" / "train_state.pt", weights_only=False)["log"]
    cfg = training_defaults(lr=1e-3, **common)
    assert [r["lr"] for r in log if r["step"] != 2] == [runner.lr_at(i, cfg) for i in range(3)]
    assert last["step"] == 4 and last["skipped_steps"] == 1 and log[1]["skipped_steps"] == 1


# -- SIGTERM / Ctrl-C ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_and_the_rerun_resumes_bit_exact(hf, sig):
    root = hf["root"] / f"sig{int(sig)}"
    common = dict(init_from=hf["dpt"], data=hf["data"], max_steps=40, batch_size=2, log_interval=1,
                  eval_interval=0, save_interval=1000, max_length=96, lr=1e-3, warmup_frac=0.2)
    run("sft", out_dir=str(root / "straight"), **common)
    cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"), *script_args("sft", **common, out_dir=str(root / "cut"))]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 3:"):
            p.send_signal(sig)
    assert p.wait(timeout=120) == 128 + int(sig), "".join(lines)[-3000:]
    step = torch.load(root / "cut" / "train_state.pt", weights_only=False)["step"]
    assert 3 <= step < 40 and f"{sig.name}: saved step {step}" in "".join(lines)
    run("sft", out_dir=str(root / "cut"), **common)
    a, b = weights(root / "straight"), weights(root / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_cast_to_bf16_keeps_rotary_frequencies_float32(hf):
    """model.to(bf16) would cast the rotary inv_freq buffer too: at position 1000 the angle would be off by radians."""
    from common import cast_weights
    t = VLM.from_pretrained(hf["teacher"])
    inv = t.llm.model.rotary_emb.inv_freq.clone()
    cast_weights(t, torch.bfloat16)
    assert next(t.llm.parameters()).dtype == torch.bfloat16
    assert t.llm.model.rotary_emb.inv_freq.dtype == torch.float32 and torch.equal(t.llm.model.rotary_emb.inv_freq, inv)


# -- out_dir that checkpoints could never be written to: refused before any model is built ----------------------------

@pytest.mark.parametrize("case", ["file", "parent_file", "read_only"])
def test_an_out_dir_that_cannot_be_written_is_refused_at_start_up(case, tmp_path, monkeypatch):
    if case == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory anyway")
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = {"file": blocker, "parent_file": blocker / "run", "read_only": tmp_path / "ro" / "run"}[case]
    if case == "read_only":
        (tmp_path / "ro").mkdir(mode=0o555)

    def built(*a, **k):
        raise AssertionError("a model was built before out_dir was checked")
    monkeypatch.setattr(runner, "ready", built)
    why = {"file": f"{blocker} is a file, not a directory", "parent_file": f"{blocker} is a file, not a directory",
           "read_only": f"cannot write in {tmp_path / 'ro'}"}[case]
    with pytest.raises(ValueError) as e:
        run("sft", init_from="nowhere", data=str(tmp_path / "d.json"), out_dir=str(out))
    assert str(e.value).startswith(f"out_dir={out}: {why}") and "\n" not in str(e.value)
    assert blocker.read_text() == "not a directory" and not os.path.exists(str(out) + ".tmp")


def test_a_new_students_start_depends_on_its_seed_alone(hf):
    """Reading a checkpoint moves torch's random stream; a new student's weights (scratch LM, or a backbones
    connector) must not depend on what was read before it, e.g. whether the teacher was loaded first."""
    base = training_defaults(data=hf["data"], teacher=hf["teacher"], seed=5)
    cases = [dict(init_from="scratch", llm=dict(model_type="qwen2", hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
             dict(init_from="backbones", vision_model=hf["siglip"], llm_model=hf["student_lm"])]
    for case in cases:
        cfg = dict(base, **case)
        starts = []
        for history in (0, 1):
            torch.manual_seed(0)
            if history:
                VLM.from_pretrained(hf["teacher"])  # what a distilling stage reads before its student
            starts.append(run_models.load_student(cfg, None, None).state_dict())
        assert starts[0].keys() == starts[1].keys()
        assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0]), case["init_from"]


def test_a_step_without_any_sample_logs_no_losses(hf):
    """A skipped step has no loss: its log record leaves the loss terms out (None), where it logged 0 and loss curves
    dipped to zero; a record over steps with samples averages theirs alone."""
    root = hf["root"] / "skip_log"
    data = write_layout(root / "data.json", [["image"], ["missing"], ["image"], ["missing"]])
    run("sft", init_from=hf["dpt"], data=data, batch_size=1, max_steps=4, out_dir=str(root / "every"))
    log = torch.load(root / "every" / "train_state.pt", weights_only=False)["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [[r[k] is None for k in run_log.LOSSES] for r in log] == [[False] * 4, [True] * 4] * 2
    assert all(r["lm"] > 0 for r in log[::2])
    run("sft", init_from=hf["dpt"], data=data, batch_size=1, max_steps=4, log_interval=2, out_dir=str(root / "two"))
    pairs = torch.load(root / "two" / "train_state.pt", weights_only=False)["log"]
    assert [r["step"] for r in pairs] == [2, 4] and pairs[0]["lm"] == pytest.approx(log[0]["lm"], rel=1e-6)


# -- one writer per out_dir ------------------------------------------------------------------------------------------

def test_a_second_run_on_a_live_out_dir_is_refused_and_a_finished_one_leaves_no_lock(hf, tmp_path, monkeypatch):
    """While a run writes out_dir it holds <out_dir>.lock (flock): a second writer is refused at start, before any
    model is built, with one line. The lock goes with the run (returned, failed, or killed: the OS drops it), so the
    lock file left behind blocks nothing."""
    import fcntl
    out = tmp_path / "run"
    common = dict(init_from=hf["dpt"], data=hf["data"], out_dir=str(out))
    holder = open(str(out) + ".lock", "w")  # what a live run holds (another open file: flock sees two owners)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def built(*a, **k):
        raise AssertionError("a model was built on a live out_dir")
    with monkeypatch.context() as m:
        m.setattr(runner, "ready", built)
        with pytest.raises(ValueError) as e:
            run("sft", **common)
    assert str(e.value) == (f"out_dir={out}: another run is writing it now (it holds {out}.lock); wait for it to "
                            "end, or choose another out_dir")
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".tmp")
    holder.close()  # that run ends
    assert run("sft", stop_after=1, **common)["step"] == 1
    with open(str(out) + ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: released when train() returned
    with monkeypatch.context() as m:  # and when it failed
        m.setattr(runner, "ready", built)
        with pytest.raises(AssertionError):
            run("sft", **common)
    assert run("sft", **common)["step"] == 2


@pytest.mark.slow
def test_a_killed_run_leaves_no_stuck_lock(hf, tmp_path):
    """A process that holds the lock blocks the out_dir while it lives; killed (SIGKILL: nothing of ours runs), it
    blocks nothing."""
    out = tmp_path / "run"
    code = ("import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True);"
            " sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(out) + ".lock"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match="another run is writing it now"):
            run("sft", init_from=hf["dpt"], data=hf["data"], out_dir=str(out))
    finally:
        p.kill()
        p.wait(timeout=60)
    assert run("sft", init_from=hf["dpt"], data=hf["data"], out_dir=str(out))["step"] == 2
