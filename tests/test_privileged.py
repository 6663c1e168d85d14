"""
    python -m pytest -q tests/test_privileged.py

privileged.py, the shapes teacher's privileged supervision: targets from hand-made scenes, the loss at its minimum
exactly at the target, the heads' maps against eager attention, and a teacher run that keeps none of it in its
checkpoint.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import privileged as pv
import shapes
import shapes_tower
from conftest import stage_main
from data import IGNORE_INDEX, tokenize_conversation
from model import VLM

# A hand-made scene (3x3 grid): cells are row * 3 + col.
SCENE = [dict(color="red", shape="star", size="small", row=0, col=0),      # 0: cell 0
         dict(color="blue", shape="circle", size="large", row=0, col=2),   # 1: cell 2
         dict(color="green", shape="square", size="large", row=2, col=1)]  # 2: cell 7


@pytest.mark.parametrize("question, answer, about", [
    ("what color is the star ?", "red", ([0], [0])),
    ("what shape is blue ?", "circle", ([1], [1])),
    ("what size is the green square ?", "large", ([2], [2])),
    ("is the red star left of the blue circle ?", "yes", ([0], [1])),
    ("is the green square above the star ?", "no", ([2], [0])),
    ("what is right of the red star ?", "blue circle", ([1], [0])),
    ("is there a red star in the image ?", "yes", ([0], [0])),
    ("is there a red circle in the image ?", "no", ([0], [1])),      # binding foil: colour's and shape's objects
    ("is there a yellow object in the image ?", "no", ([], [])),     # absent: the look goes elsewhere
    ("is there a cross in the image ?", "no", ([], [])),
    ("how many objects are there ?", "three", ([0, 1, 2], [0, 1, 2])),
    ("how many large objects are there ?", "two", ([1, 2], [1, 2])),
    ("where is the blue circle ?", "top right", ([1], [1])),
    ("what is in the top left ?", "red star", ([0], [0])),
    ("what is in the middle center ?", "nothing", ([], [])),
    ("<image>\nwhat is the relation between the red star and the blue circle ?", "left of", ([0], [1])),
])
def test_each_question_kind_looks_at_the_objects_it_is_about(question, answer, about):
    assert pv.question_objects(question, answer, SCENE) == about


def test_captions_look_at_the_object_being_described_then_at_both():
    # a(0) red(1) star(2) left(3) of(4) a(5) blue(6) circle(7) <eos>(8)
    A, B = [0], [1]
    assert pv.caption_objects("a red star left of a blue circle", SCENE) == [(A, A)] * 3 + [(A, B)] * 6
    # a(0) green(1) square(2) ,(3) a(4) circle(5) <eos>(6): articles and commas lead in to the next phrase
    C = [2]
    assert pv.caption_objects("a green square , a circle", SCENE) == [(C, C)] * 3 + [(B, B)] * 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny default-layout world (24 px, 3x3 grid, 8 px patches: one token per cell) and a 2-step tower."""
    root = tmp_path_factory.mktemp("privileged")
    data = root / "shapes"
    shapes.generate(str(data), n_train=24, n_test=2, image_size=24, progress=False)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=24, patch_size=8)
    shapes_tower.pretrain_tower(str(data), str(data / "vision_tower"), vision=vision, steps=2, batch_size=4,
                                progress=False)
    return dict(root=root, data=data, scenes=json.load(open(data / "scenes.json")))


def test_targets_of_a_tokenized_sample_by_hand(world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(world["data"] / "tokenizer"))
    image = "images/train_00000.png"
    objs = world["scenes"][image]["objects"]
    a, b = objs[0], objs[1]
    rel = shapes.relation(a, b)[0]
    q = f"is the {a['color']} {a['shape']} {shapes.rel_text(rel)} the {b['color']} {b['shape']} ?"
    rec = {"image": image, "conversations": [{"from": "human", "value": "<image>\n" + q},
                                             {"from": "gpt", "value": "yes"}]}
    ids, labels = tokenize_conversation(rec["conversations"], tok, 9, True)
    t = pv.SceneTargets(str(world["data"] / "scenes.json"), tok, 9)(rec, ids, labels)
    words = tok.convert_ids_to_tokens(ids)
    one_hot = lambda o: torch.eye(10)[o["row"] * 3 + o["col"]]
    # noun-phrase rows: the colour word names one object (colours are unique), and so does the shape after it
    for p, w in enumerate(words):
        if w in (a["color"], a["shape"]):
            assert torch.equal(t["np"][p], one_hot(a)), w
        elif w in (b["color"], b["shape"]):
            assert torch.equal(t["np"][p], one_hot(b)), w
        elif w not in ("small", "large"):
            assert t["np"][p].sum() == 0, w
    # the answer heads and the readout at the two positions predicting "yes" and <eos>
    pred = [p - 1 for p in range(len(ids)) if labels[p] != IGNORE_INDEX]
    assert len(pred) == 2
    side = lambda x, y: 1 + (x > y) - (x < y)
    for p in range(len(ids)):
        if p in pred:
            assert torch.equal(t["answer"][p, 0], one_hot(a)) and torch.equal(t["answer"][p, 1], one_hot(b))
            assert t["readout"][p].tolist() == [a["row"], a["col"], b["row"], b["col"], side(a["col"], b["col"]),
                                                side(a["row"], b["row"])]
            assert words[t["relword"][p]] == rel  # the relation word the question asks about
        else:
            assert t["answer"][p].sum() == 0 and (t["readout"][p] == IGNORE_INDEX).all() and t["relword"][p] < 0


@pytest.mark.parametrize("place_words", [False, True])
def test_place_words_look_at_the_named_row_then_the_cell(world, place_words):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(world["data"] / "tokenizer"))
    image = "images/train_00000.png"
    objs = world["scenes"][image]["objects"]
    rows, cols = shapes.position_words(3)
    a = objs[0]
    empty = next((r, c) for r in range(3) for c in range(3) if all((o["row"], o["col"]) != (r, c) for o in objs))
    one_hot = lambda cell: torch.eye(10)[cell]
    share = lambda objects: sum(one_hot(o["row"] * 3 + o["col"]) for o in objects) / len(objects)
    st = pv.SceneTargets(str(world["data"] / "scenes.json"), tok, 9, place_words=place_words)
    for (r, c), in_cell in (((a["row"], a["col"]), [a]), (empty, [])):
        q = f"what is in the {rows[r]} {cols[c]} ?"
        rec = {"image": image, "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                 {"from": "gpt", "value": "nothing"}]}
        ids, labels = tokenize_conversation(rec["conversations"], tok, 9, True)
        t = st(rec, ids, labels)
        words = tok.convert_ids_to_tokens(ids)
        p = words.index(rows[r], words.index("in"))
        if not place_words:
            assert t["np"][p].sum() == 0 and t["np"][p + 1].sum() == 0
            continue
        in_row = [o for o in objs if o["row"] == r]
        assert torch.allclose(t["np"][p], share(in_row) if in_row else one_hot(9)), (r, c)  # 9: "elsewhere"
        assert torch.equal(t["np"][p + 1], one_hot(a["row"] * 3 + a["col"]) if in_cell else one_hot(9)), (r, c)
        assert all(t["np"][k].sum() == 0 for k in range(len(ids)) if k not in (p, p + 1))  # no NP words here


def test_test_images_and_unknown_images_are_refused(world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(world["data"] / "tokenizer"))
    st = pv.SceneTargets(str(world["data"] / "scenes.json"), tok, 9)
    conv = [{"from": "human", "value": "<image>\nwhat shape is red ?"}, {"from": "gpt", "value": "star"}]
    ids, labels = tokenize_conversation(conv, tok, 9, True)
    with pytest.raises(ValueError, match="test image"):
        st({"image": "images/test_00000.png", "conversations": conv}, ids, labels)
    with pytest.raises(ValueError, match="not in the world"):
        st({"image": "images/elsewhere.png", "conversations": conv}, ids, labels)


def test_a_subword_tokenizer_is_refused(world):
    from conftest import bpe_tokenizer
    with pytest.raises(ValueError, match="word-level tokenizer"):
        pv.SceneTargets(str(world["data"] / "scenes.json"), bpe_tokenizer(), 9)


def test_look_loss_is_zero_exactly_at_the_target_and_positive_elsewhere():
    torch.manual_seed(0)
    B, T, N = 2, 5, 4
    S = T + N
    cols = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    target = torch.zeros(B, T, N + 1)
    target[0, 2] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])  # two objects
    target[1, 4] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # absent: all elsewhere
    # attention equal to the target over the N + 1 bins (the elsewhere mass spread over the other keys)
    probs = torch.softmax(torch.randn(B, 1, T, S), -1)
    for b, p, in ((0, 2), (1, 4)):
        row = torch.zeros(S)
        row[cols[b]] = target[b, p, :N]
        rest = [s for s in range(S) if s not in cols[b].tolist()]
        row[rest] = target[b, p, N] / len(rest)
        probs[b, 0, p] = row
    assert pv.look_loss(probs, cols, target).item() == pytest.approx(0.0, abs=1e-6)
    off = probs.clone()
    off[0, 0, 2, cols[0, 0]] -= 0.1
    off[0, 0, 2, cols[0, 2]] += 0.1
    # KL(t || p) of the two-object row, averaged with the other (zero) row: 0.5 log(0.5/0.4) / 2
    assert pv.look_loss(off, cols, target).item() == pytest.approx(0.5 * torch.log(torch.tensor(0.5 / 0.4)).item() / 2,
                                                                   rel=1e-4)


def test_head_probs_equal_eager_attention_per_head():
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        eager = lm(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[1]  # (B, H, T, T)
    rec = pv._Recorder()
    vlm_lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="compodistill_sdpa").eval()
    vlm_lm.load_state_dict(lm.state_dict())
    import attention_distill as ad
    ad.attention_modules(vlm_lm)[1]._vat_capture = rec
    with torch.no_grad():
        vlm_lm(input_ids=ids, attention_mask=mask)
    q, k, m, sc = rec.seen[1]
    p = pv.head_probs(q, k, m, (1, 3), sc)
    assert torch.allclose(p[0], eager[0, [1, 3]], atol=1e-5)
    assert torch.allclose(p[1, :, :5], eager[1, [1, 3], :5], atol=1e-5)  # the real rows of the padded sample


TEACHER = dict(stage="sft", init_from="scratch", batch_size=4, log_interval=1, eval_interval=0, save_interval=100,
               lr=1e-3, max_length=96, warmup_frac=0.0, look_weight=1.0, readout_weight=1.0,
               llm=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=True))


def teacher_run(world, out, **kw):
    d = world["data"]
    cfg = dict(TEACHER, data=f"{d}/pretrain.json,{d}/instruct.json", vision_model=str(d / "vision_tower"),
               out_dir=str(out), **kw)
    return stage_main({}, [f"--{k}={v}" for k, v in cfg.items()])


def test_a_teacher_trains_with_it_keeps_none_of_it_and_resumes_bit_exact(world):
    root = world["root"]
    teacher_run(world, root / "straight", max_steps=4)
    teacher_run(world, root / "resumed", max_steps=4, stop_after=2)
    teacher_run(world, root / "resumed", max_steps=4)
    a, b = load_file(root / "straight" / "model.safetensors"), load_file(root / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the readout is no part of the model: not in the weights; a resume restores it from train_state.pt
    assert not any("readout" in k for k in a)
    VLM.from_pretrained(str(root / "straight"))  # loads as a plain VLM (strict)
    sa = torch.load(root / "straight" / "train_state.pt", weights_only=False)
    sb = torch.load(root / "resumed" / "train_state.pt", weights_only=False)
    assert all(torch.equal(sa["privileged"][k], sb["privileged"][k]) for k in sa["privileged"])
    log = [json.loads(line) for line in open(root / "straight" / "train_log.jsonl")]
    assert all(r["look"] > 0 and r["readout"] > 0 for r in log)
    # the losses really train: the same run at lr 0 ends where it began
    teacher_run(world, root / "frozen", max_steps=1, lr=0.0)
    r0 = json.loads(open(root / "frozen" / "train_log.jsonl").readline())
    assert r0["total"] == pytest.approx(r0["lm"] + r0["look"] + r0["readout"], rel=1e-5)


@pytest.mark.parametrize("stage", ["dpt", "dft"])
def test_a_distilling_stage_refuses_it(stage, tmp_path):
    with pytest.raises(ValueError, match="privileged supervision is for training a teacher"):
        stage_main(dict(stage=stage), ["--look_weight=1", f"--out_dir={tmp_path / 'x'}"])
