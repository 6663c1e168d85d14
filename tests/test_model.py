"""
    python -m pytest -q tests/test_model.py

VLM splicing, TAF, save/load, how a model starts (load_vlm), generation and the TeacherStudent losses.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import attention_distill as ad
from conftest import (IMAGE_TOKEN_ID, bpe_tokenizer, llm_cfg, save_llava, save_lm, save_tower, tiny_batch,
                      tiny_pair, tiny_vlm)
from data import IGNORE_INDEX
from model import VLM, TeacherStudent, load_vlm
from run_models import enable_checkpointing, set_trainable


def test_splicing_puts_visual_tokens_at_placeholders():
    m = tiny_vlm()
    b = tiny_batch()
    img = torch.randn(2, m.num_image_tokens, 32)
    emb = m.embed(b["input_ids"], img)
    plain = m.llm.get_input_embeddings()(b["input_ids"])
    assert torch.equal(emb[0, 2:6], img[0]) and torch.equal(emb[1, 1:5], img[1])
    is_img = b["input_ids"] == IMAGE_TOKEN_ID
    assert torch.equal(emb[~is_img], plain[~is_img])  # everything else is the text embedding
    assert (b["labels"][is_img] == IGNORE_INDEX).all()
    out = m(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"])  # mixed batch runs
    assert out["logits"].shape == (3, 10, 40) and torch.isfinite(out["loss"])


def test_image_count_mismatch_is_a_clear_error():
    m = tiny_vlm()
    b = tiny_batch()
    with pytest.raises(ValueError, match="2 samples with image tokens but 1 images"):
        m(b["input_ids"], b["attention_mask"], b["pixel_values"][:1])
    ids = b["input_ids"].clone()
    ids[0, 2] = 5  # 3 image tokens instead of 4
    with pytest.raises(ValueError, match=r"samples \[0\] hold \[3\] image tokens"):
        m(ids, b["attention_mask"], b["pixel_values"])


def test_taf_copies_frozen_teacher_connector_and_dpt_trains_post_connector_only():
    ts = tiny_pair(taf=True)
    s, t = ts.student, ts.teacher
    for a, b in zip(s.connector.parameters(), t.connector.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    assert s.post_connector.weight.shape == (32, 48)  # (d_student, d_teacher)
    trainable = set_trainable(s, train_llm=False)
    assert [p.shape for p in trainable] == [(32, 48), (32,)]
    out = ts(tiny_batch())
    out["total"].backward()
    got = sorted(n for n, p in s.named_parameters() if p.grad is not None)
    assert got == ["post_connector.bias", "post_connector.weight"]
    assert all(p.grad is None for p in t.parameters())
    # DFT trains the LM too; the TAF connector and the vision tower never
    names = {n for n, p in s.named_parameters() if p.requires_grad} if set_trainable(s, train_llm=True) else set()
    assert "post_connector.weight" in names and "llm.model.layers.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith(("connector.", "vision_tower.")) for n in names)


def test_shared_tower_and_teacher_connector_reuse_give_the_same_losses():
    ts = tiny_pair(taf=True)
    b = tiny_batch()
    fast = ts(b)
    assert ts.shared_vision and ts._reuses_teacher_connector()
    ts.shared_vision = False  # force separate vision forwards and the student's own connector copy
    slow = ts(b)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k])


def _direct(ts, b):
    s_out = ts.student(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"])
    t_out = ts.teacher(b["input_ids"], b["attention_mask"], b["pixel_values"])
    return s_out, t_out


def test_lm_loss_and_total_against_the_plain_forward():
    ts = tiny_pair(taf=False)
    b = tiny_batch()
    out = ts(b)
    s_out, _ = _direct(ts, b)
    torch.testing.assert_close(out["lm"], s_out["loss"])
    assert out["vat"] > 0
    torch.testing.assert_close(out["total"], out["lm"] + out["kd"] + out["vat"])


def test_kd_reads_the_positions_that_predict_an_answer_token():
    ts = tiny_pair(taf=False)
    b = tiny_batch()
    out = ts(b)
    s_out, t_out = _direct(ts, b)
    # KD brute force: position i predicts labels[i + 1] (shifted like the LM loss)
    terms = [F.kl_div(F.log_softmax(s_out["logits"][r, i], -1), F.softmax(t_out["logits"][r, i], -1), reduction="sum")
             for r in range(3) for i in range(9) if b["labels"][r, i + 1] != IGNORE_INDEX]
    torch.testing.assert_close(out["kd"], torch.stack(terms).mean())
    # the reference code's unshifted mask reads other positions: a different number
    same_pos = b["labels"] != IGNORE_INDEX
    assert abs(float(ad.kd_loss(s_out["logits"][same_pos], t_out["logits"][same_pos])) - float(out["kd"])) > 1e-4


@pytest.mark.parametrize("form", [dict(matching="simple"), dict(matching="simple", vat_pool="flat", vat_queries="all"),
                                  dict(matching="adaptive")])
def test_a_student_identical_to_its_teacher_has_zero_kd_and_vat(form):
    ts = tiny_pair(taf=False)
    same = TeacherStudent(ts.teacher, copy.deepcopy(ts.teacher),
                          ad.VATSettings(student_layers=[2, 3], teacher_layers=[2, 3], **form))
    o = same(tiny_batch())
    assert float(o["kd"]) == pytest.approx(0, abs=1e-6) and float(o["vat"]) == pytest.approx(0, abs=1e-5)


def test_without_a_teacher_the_loss_is_the_lm_loss():
    ts = tiny_pair(taf=False)
    b = tiny_batch()
    sft = TeacherStudent(None, ts.student)(b)
    torch.testing.assert_close(sft["total"], _direct(ts, b)[0]["loss"])
    assert sft["kd"] == 0 and sft["vat"] == 0


def test_save_load_identical_logits(tmp_path):
    ts = tiny_pair(taf=True)
    s = ts.student
    b = tiny_batch()
    before = s(b["input_ids"], b["attention_mask"], b["pixel_values"])["logits"]
    s.save_pretrained(tmp_path / "ckpt")
    s2 = VLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert s2.config.taf and s2.post_connector is not None
    after = s2(b["input_ids"], b["attention_mask"], b["pixel_values"])["logits"]
    assert torch.equal(before, after)


def test_generate_matches_uncached_greedy_loop():
    m = tiny_vlm(layers=2)
    b = tiny_batch()
    ids, mask, pv = b["input_ids"][:2], b["attention_mask"][:2], b["pixel_values"]
    got = m.generate(ids, mask, pv, max_new_tokens=5)
    for i in range(2):  # one sample at a time, no cache, no padding
        n = int(mask[i].sum())
        seq = ids[i:i + 1, :n]
        for step in range(got.shape[1]):
            logits = m(seq, torch.ones_like(seq), pv[i:i + 1])["logits"]
            logits[0, -1, IMAGE_TOKEN_ID] = float("-inf")
            nxt = logits[0, -1].argmax()
            assert nxt == got[i, step]
            if nxt == m.llm.config.eos_token_id:
                break
            seq = torch.cat([seq, nxt.view(1, 1)], 1)


def test_from_backbones_on_saved_tiny_checkpoints(tmp_path):
    """The real-model path (pretrained SigLIP + causal LM + tokenizer) on tiny checkpoints saved here."""
    from transformers import AutoModelForCausalLM, SiglipVisionModel
    from conftest import llm_cfg, vision_cfg
    from data import image_processor
    from model import backbone_config

    torch.manual_seed(0)
    SiglipVisionModel(backbone_config(vision_cfg())).save_pretrained(tmp_path / "vision")
    image_processor(16).save_pretrained(tmp_path / "vision")
    # an LM whose tokenizer lacks <image>: from_backbones must add it and grow the embeddings
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "red": 3, "circle": 4}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    plain.save_pretrained(tmp_path / "llm")
    AutoModelForCausalLM.from_config(backbone_config(dict(llm_cfg(), vocab_size=5))).save_pretrained(tmp_path / "llm")

    m = VLM.from_backbones(str(tmp_path / "vision"), str(tmp_path / "llm"))
    assert m.image_token_id == 5 and m.llm.get_input_embeddings().num_embeddings == 6
    assert m.tokenizer.convert_tokens_to_ids("<image>") == 5
    vision = SiglipVisionModel.from_pretrained(tmp_path / "vision")
    assert all(torch.equal(a, b) for a, b in zip(m.vision_tower.parameters(), vision.parameters()))
    ids = torch.tensor([[3, 5, 5, 5, 5, 4]])
    out = m(ids, torch.ones_like(ids), torch.randn(1, 3, 16, 16), labels=ids.masked_fill(ids == 5, IGNORE_INDEX))
    assert out["logits"].shape == (1, 6, 6) and torch.isfinite(out["loss"])
    m.save_pretrained(tmp_path / "ckpt")  # and it round-trips like any other checkpoint
    m2 = VLM.from_pretrained(str(tmp_path / "ckpt"))
    assert torch.equal(m2(ids, torch.ones_like(ids), torch.zeros(1, 3, 16, 16))["logits"],
                       m(ids, torch.ones_like(ids), torch.zeros(1, 3, 16, 16))["logits"])


def test_vat_gradients_are_the_same_with_gradient_checkpointing():
    ts = tiny_pair(taf=True)
    set_trainable(ts.student, train_llm=True)
    ts.student.train()
    b = tiny_batch()

    def grads():
        ts.student.zero_grad(set_to_none=True)
        out = ts(b)
        out["vat"].backward()
        return out["vat"].detach(), {n: p.grad.clone() for n, p in ts.student.named_parameters() if p.grad is not None}

    vat, want = grads()
    enable_checkpointing(ts.student.llm)
    vat_ckpt, got = grads()
    torch.testing.assert_close(vat_ckpt, vat)
    assert got.keys() == want.keys() and any(g.abs().sum() > 0 for g in want.values())
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def test_train_vision_gives_the_tower_gradients_only_when_asked():
    m = tiny_vlm()
    b = tiny_batch()
    for train_vision in (False, True):
        m.zero_grad(set_to_none=True)
        set_trainable(m, train_llm=True, train_vision=train_vision)
        m(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"])["loss"].backward()
        grads = {n: p.grad is not None for n, p in m.vision_tower.named_parameters()}
        # features come from layer -2: the patch embedding and the first layer learn, the last layer is unused
        used = [n for n in grads if ".embeddings." in n or ".layers.0." in n]
        assert used and all(grads[n] for n in used) if train_vision else not any(grads.values())


@pytest.mark.parametrize("kd", [False, True])
def test_teacher_runs_on_a_text_only_micro_batch_when_a_loss_needs_it(kd):
    """Under FSDP the teacher's decoder layers gather their shards from every rank: a rank whose micro-batch has no
    image must run them too. VAT then counts for nothing there (it is a zero with a graph) and the gradients are
    what the LM and KD losses give."""
    ts = tiny_pair(taf=True)
    set_trainable(ts.student, train_llm=True)
    b = tiny_batch()
    text = {k: v[2:] for k, v in b.items() if k != "pixel_values"}  # the text-only sample alone
    calls = []
    for layer in ts.teacher.llm.model.layers:
        layer.register_forward_hook(lambda *a: calls.append(1))
    out = ts(text, with_kd=kd, with_vat=True)
    assert len(calls) == len(ts.teacher.llm.model.layers)
    assert float(out["vat"]) == 0.0 and out["vat"].requires_grad
    out["total"].backward()
    grads = {n: p.grad.clone() for n, p in ts.student.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    ts.student.zero_grad(set_to_none=True)
    ts(text, with_kd=kd, with_vat=False)["total"].backward()  # the same gradients as without VAT
    for n, p in ts.student.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n]), n


# -- how a model starts: every form of init_from, each directory asked once what it is ---------------------------

START = dict(init_from="scratch", vision_feature_select_strategy="", seed=0, vision_model="", llm_model="",
             connector="mlp2x_gelu", llm={}, vision={}, teacher="", tokenizer="", image_processor="", data="d.json")


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    """The directories a model starts from: a SigLIP tower, a bf16 LM with its tokenizer, a Hugging Face LLaVA one
    (CLIP + Llama, saved by transformers) and one of ours (sharded), plus transformers' own LLaVA read of the latter."""
    from transformers import LlavaForConditionalGeneration
    root = tmp_path_factory.mktemp("starts")
    d = dict(tower=save_tower(root / "tower"), lm=save_lm(root / "lm", bpe_tokenizer()),
             llava=save_llava(root / "llava", tower="clip", arch="llama", bos=True), ours=str(root / "ours"))
    VLM.from_backbones(d["tower"], d["lm"], seed=0).save_pretrained(d["ours"], max_shard_bytes=60_000)
    d["hf"] = LlavaForConditionalGeneration.from_pretrained(d["llava"], dtype=torch.float32).eval()
    return d


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.mark.parametrize("form", ["ours", "llava", "backbones_llava_tower", "scratch_on_our_tower",
                                  "scratch_on_a_llava_teacher"])
def test_each_start_asks_each_directory_once_and_loads_what_transformers_loads(starts, form, monkeypatch):
    """load_vlm decides once what each directory is (its config.json read once by checkpoint.py, whatever the form)
    and loads the weights transformers' own classes load from it."""
    from transformers import SiglipVisionModel
    import checkpoint
    d, hf = starts, starts["hf"]
    cfg, asked = {"ours": dict(init_from=d["ours"]), "llava": dict(init_from=d["llava"]),
                  "backbones_llava_tower": dict(init_from="backbones", vision_model=d["llava"], llm_model=d["lm"]),
                  "scratch_on_our_tower": dict(vision_model=d["ours"], tokenizer=d["lm"], llm=llm_cfg(layers=2)),
                  "scratch_on_a_llava_teacher": dict(teacher=d["llava"], llm=llm_cfg(layers=2))}[form], []
    real = checkpoint.read_json
    monkeypatch.setattr(checkpoint, "read_json", lambda f: asked.append(f) or real(f))
    m = load_vlm(dict(START, **cfg))
    configs = [os.path.dirname(f) for f in asked if os.path.basename(f) == "config.json"]
    named = [cfg.get(k) for k in ("init_from", "vision_model", "teacher") if cfg.get(k) in (d["ours"], d["llava"])]
    assert sorted(configs) == sorted(named), f"config.json read {len(configs)} times for {named}"
    if "llava" in form:  # the tower as LlavaForConditionalGeneration reads it, with its feature layer and selection
        assert same(m.vision_tower.state_dict(), hf.model.vision_tower.state_dict())
        assert (m.config.vision_feature_layer, m.config.vision_feature_select_strategy) == \
            (hf.config.vision_feature_layer, hf.config.vision_feature_select_strategy) == (-2, "default")
    else:  # ours was built on the SigLIP tower
        assert same(m.vision_tower.state_dict(), SiglipVisionModel.from_pretrained(d["tower"]).state_dict())
    if form == "llava":
        proj = hf.model.multi_modal_projector
        assert same(m.llm.model.state_dict(), hf.model.language_model.state_dict())
        assert same(m.llm.lm_head.state_dict(), hf.lm_head.state_dict())
        assert same(m.connector.state_dict(), {f"{i}.{k}": v for i, lin in ((0, proj.linear_1), (2, proj.linear_2))
                                               for k, v in lin.state_dict().items()})
    if form == "ours":  # all of it, as saved
        assert same(m.state_dict(), VLM.from_backbones(d["tower"], d["lm"], seed=0).state_dict())
