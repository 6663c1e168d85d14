"""
    python -m pytest -q tests/test_run_models.py

run_models.py on tiny Hugging Face checkpoints (bf16 LMs with byte-level BPE tokenizers, SigLIP and CLIP towers):
loading teacher and student, one tokenizer, padded embeddings, TAF's tower, precision casts, compile, seeded starts.
"""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import run_models
from conftest import (CORPUS, LAYERS, bpe_tokenizer, build_models, run, save_lm, save_tower, training_defaults,
                      weights)
from model import VLM


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


# -- one tokenizer --------------------------------------------------------------------------------------------

def test_teacher_with_another_tokenizer_of_the_same_size_is_refused(hf):
    other = bpe_tokenizer(corpus=[text[::-1] for text in CORPUS])  # other merges, same size
    assert len(other) == len(bpe_tokenizer())
    lm = save_lm(hf["root"] / "other_lm", other, seed=3)
    with pytest.raises(ValueError,
                       match=r"the teacher's tokenizer \(.*teacher\) and the student's \(.*other_lm\) differ"):
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


def test_teacher_cast_to_bf16_keeps_rotary_frequencies_float32(hf):
    """model.to(bf16) would cast the rotary inv_freq buffer too: at position 1000 the angle would be off by radians."""
    from common import cast_weights
    t = VLM.from_pretrained(hf["teacher"])
    inv = t.llm.model.rotary_emb.inv_freq.clone()
    cast_weights(t, torch.bfloat16)
    assert next(t.llm.parameters()).dtype == torch.bfloat16
    assert t.llm.model.rotary_emb.inv_freq.dtype == torch.float32 and torch.equal(t.llm.model.rotary_emb.inv_freq, inv)


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
