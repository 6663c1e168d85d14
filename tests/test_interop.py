"""
python -m pytest -q tests/test_interop.py

Models in and out, against transformers' own LlavaForConditionalGeneration: Hugging Face LLaVA directories imported
(logits, generation, key layouts, shards, errors; as teacher= and init_from= of a stage and in evaluate.py), our
checkpoints sharded, and students exported to LLaVA (TAF folded, processor prompt, round trip, the refusal).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_model

import evaluate as ev
from conftest import stage_main, bpe_tokenizer, llm_cfg, save_llava, save_lm, vision_cfg, write_llava
from data import image_processor, tokenize_conversation
from export_hf import export
from attention_distill import LayerPairs, VATSettings
from checkpoint import find_checkpoint, read_weights, write_weights
from data import prepare_tokenizer
from model import VLM, VLMConfig, TeacherStudent

QUESTION = "what color is the square ?"
TOL = 1e-4  # float32 logits, max abs difference


def prompt_ids(m, question=QUESTION):
    ids, _ = tokenize_conversation([{"from": "human", "value": question}], m.tokenizer, m.num_image_tokens, True)
    return torch.tensor([ids])


def picture(seed=0, size=20):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def pixels(m, img):
    return m.image_processor(images=img, return_tensors="pt").pixel_values


def hf_llava(path):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def against_transformers(ours, hf, ids, pv, **gen_kw):
    """(max abs logit difference, our greedy ids, transformers' greedy ids) on one prompt."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        diff = (ours(ids, mask, pv)["logits"] - theirs).abs().max()
        mine = ours.generate(ids, mask, pv, max_new_tokens=8)[0].tolist()
        theirs = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=8, **gen_kw)
    return float(diff), mine, theirs[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return dict(root=root, siglip=save_llava(root / "siglip_qwen2"),
                clip=save_llava(root / "clip_llama", tower="clip", arch="llama", bos=True, seed=1))


# -- import ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["siglip_qwen2", "clip_llama", "siglip_qwen3_default_layer-1_tied"])
def test_llava_import_gives_transformers_logits_and_generation(llava, case, tmp_path):
    from transformers import AutoProcessor
    path = {"siglip_qwen2": lambda: llava["siglip"], "clip_llama": lambda: llava["clip"],
            "siglip_qwen3_default_layer-1_tied": lambda: save_llava(tmp_path / "q3", arch="qwen3", strategy="default",
                                                                    feature_layer=-1, tie=True)}[case]()
    ours = VLM.from_pretrained(path).eval()
    hf = hf_llava(path)
    assert next(ours.parameters()).dtype == torch.float32  # a bf16 checkpoint loads as float32
    # visual tokens per image as LLaVA's processor counts them: SigLIP 2x2 patches; CLIP 2x2 patches + CLS, CLS
    # dropped by "default"; the first SigLIP patch dropped by "default"
    img = picture()
    n = AutoProcessor.from_pretrained(path)(text="<image>", images=img).input_ids[0].count(ours.image_token_id)
    assert ours.num_image_tokens == n == {"siglip_qwen2": 4, "clip_llama": 4}.get(case, 3)
    assert ours.config.vision_feature_select_strategy == hf.config.vision_feature_select_strategy
    assert ours.config.vision_feature_layer == hf.config.vision_feature_layer
    diff, mine, theirs = against_transformers(ours, hf, prompt_ids(ours), pixels(ours, img), do_sample=False,
                                              suppress_tokens=[ours.image_token_id])
    print(f"{case}: import vs transformers, max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    assert mine == theirs and len(mine) == 8
    # bfloat16 as transformers loads it: weights cast, the rotary frequencies kept in float32
    from transformers import LlavaForConditionalGeneration
    ours, hf = (VLM.from_pretrained(path, dtype=torch.bfloat16).eval(),
                LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval())
    assert next(ours.llm.parameters()).dtype == torch.bfloat16
    rotary = (ours.llm.model.rotary_emb.inv_freq, hf.model.language_model.rotary_emb.inv_freq)
    assert rotary[0].dtype == rotary[1].dtype == torch.float32
    ids, pv = prompt_ids(ours), pixels(ours, img)
    with torch.no_grad():
        diff16 = (ours(ids, torch.ones_like(ids), pv)["logits"].float()
                  - hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv).logits.float()).abs().max()
    print(f"{case}: bfloat16 import vs transformers, max |logit diff| = {float(diff16):.3g}")
    assert diff16 <= 1e-2


def rename(tensors, old, new):
    return {new + k[len(old):] if k.startswith(old) else k: t for k, t in tensors.items()}


def test_llava_key_layouts_and_shards_load_the_same_and_strays_fail_loudly(llava, tmp_path):
    src = llava["siglip"]
    want = VLM.from_pretrained(src).state_dict()
    saved = read_weights(src)
    assert any(k.startswith("language_model.model.") for k in saved)  # what save_pretrained writes in transformers 5
    tf5 = saved
    for old, new in [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("vision_tower.", "model.vision_tower.")]:
        tf5 = rename(tf5, old, new)
    hub = rename(saved, "vision_tower.", "vision_tower.vision_model.")  # older hub checkpoints (llava-hf/*)
    # which also saved buffers that are rebuilt from the config today
    hub["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(4)[None]
    hub["language_model.model.rotary_emb.inv_freq"] = torch.ones(4)

    def variant(name, tensors, shard_bytes=None):
        d = tmp_path / name
        shutil.copytree(src, d)
        write_weights(tensors, str(d), shard_bytes or 2**40)
        return str(d)

    for name, tensors in [("tf5", tf5), ("hub", hub)]:
        d = variant(name, tensors, shard_bytes=60_000)  # sharded, as hub checkpoints come
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
        assert not os.path.exists(os.path.join(d, "model.safetensors"))
        assert len([f for f in os.listdir(d) if f.startswith("model-")]) >= 3
        got = VLM.from_pretrained(d).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name

    with pytest.raises(ValueError, match=r"1 tensors of this LLaVA checkpoint map to nothing.*mm_projector\.0\.weight"):
        VLM.from_pretrained(variant("stray", dict(saved, **{"mm_projector.0.weight": torch.zeros(2)})))
    with pytest.raises(ValueError, match=r"1 missing \['connector\.2\.bias'\], 0 unexpected"):
        VLM.from_pretrained(variant("missing", {k: t for k, t in saved.items()
                                                if k != "multi_modal_projector.linear_2.bias"}))
    d = variant("lost_shard", hub, shard_bytes=60_000)
    os.remove(os.path.join(d, sorted(f for f in os.listdir(d) if f.startswith("model-"))[1]))
    with pytest.raises(FileNotFoundError, match="lists the shard model-00002"):
        VLM.from_pretrained(d)


def test_another_kind_of_directory_is_a_clear_error(tmp_path):
    lm = save_lm(tmp_path / "qwen2_lm", bpe_tokenizer())
    for load in (VLM.from_pretrained, ev._load):
        with pytest.raises(ValueError, match=r"model_type 'qwen2' \(architectures \['Qwen2ForCausalLM'\]\).*"
                                             r"CompoDistill checkpoint.*LLaVA directory.*init_from=backbones"):
            load(lm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json \(found: nothing\); expected a CompoDistill"):
        ev._load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        stage_main(dict(stage="sft"), [f"--init_from={lm}", f"--out_dir={tmp_path / 'out'}",
                                         f"--data={write_llava(tmp_path / 'd.json', ['image'] * 2)}"])


def test_llava_dirs_as_teacher_init_from_and_in_evaluate(llava, tmp_path):
    """teacher=<LLaVA dir> (CLIP + Llama, bf16) for DPT with TAF, init_from=<LLaVA dir> for SFT, evaluate.py's
    loader."""
    data = write_llava(tmp_path / "data.json", ["image"] * 4 + ["text"])
    base = dict(batch_size=2, max_steps=2, log_interval=1, eval_interval=0, save_interval=100, lr=1e-3,
                max_length=96, warmup_frac=0.0)
    args = lambda d: [f"--{k}={v}" for k, v in d.items()]
    llm = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    dpt = str(tmp_path / "dpt")
    log = stage_main(dict(stage="dpt", kd_weight=1.0, taf=True), args({
        **base, "init_from": "scratch", "teacher": llava["clip"], "data": data, "out_dir": dpt, "llm": llm,
        "student_layers": [0, 1], "teacher_layers": [0, 1]}))
    assert log["kd"] > 0 and np.isfinite(log["total"])
    student, teacher = VLM.from_pretrained(dpt), read_weights(llava["clip"])
    assert student.config.taf and student.num_image_tokens == 4  # CLIP's CLS dropped, as in the teacher
    assert torch.equal(student.connector[2].weight, teacher["multi_modal_projector.linear_2.weight"].float())
    sft = str(tmp_path / "sft")
    stage_main(dict(stage="sft"), args({**base, "init_from": llava["siglip"], "data": data, "out_dir": sft}))
    assert find_checkpoint(llava["siglip"]) == llava["siglip"]
    assert VLM.from_pretrained(sft).config.extra["stage"] == "sft"
    m, p = ev._load(llava["siglip"])
    assert p == llava["siglip"] and m.config.extra["imported_from"] == "llava"


def test_a_scratch_student_reads_the_llava_teachers_feature_layer(tmp_path):
    """A SigLIP LLaVA on vision_feature_layer -1 (not LLaVA's usual -2): init_from=scratch builds the student on the
    teacher's layer and selection, so TAF is accepted and, without TAF, both models read the same features."""
    teacher_dir = save_llava(tmp_path / "layer-1", feature_layer=-1, strategy="default")
    data = write_llava(tmp_path / "data.json", ["image"] * 4)
    llm = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    base = dict(batch_size=2, max_steps=1, log_interval=1, eval_interval=0, save_interval=100, max_length=96,
                init_from="scratch", teacher=teacher_dir, data=data, llm=llm, student_layers=[0, 1],
                teacher_layers=[0, 1])
    args = lambda d: [f"--{k}={v}" for k, v in d.items()]
    teacher = VLM.from_pretrained(teacher_dir)
    pv = pixels(teacher, picture())
    for taf in (True, False):
        out = str(tmp_path / f"taf{taf}")
        stage_main(dict(stage="dpt", kd_weight=1.0, taf=taf), args({**base, "out_dir": out}))
        s = VLM.from_pretrained(out)
        assert (s.config.vision_feature_layer, s.config.vision_feature_select_strategy) == (-1, "default")
        assert torch.equal(s.vision_features(pv), teacher.vision_features(pv))


def test_a_llava_directory_as_vision_model_gives_its_own_tower(tmp_path):
    """vision_model=<LLaVA dir> (what the TAF refusal suggests for a LLaVA teacher): its vision_tower weights, image
    processor, feature layer and selection; never a randomly initialised tower."""
    from transformers import AutoImageProcessor
    path = save_llava(tmp_path / "llava", feature_layer=-1, strategy="default")
    saved = {k.removeprefix("vision_tower."): t for k, t in read_weights(path).items() if k.startswith("vision_tower.")}
    tower = VLM.load_vision_tower(path)
    got = tower.state_dict()
    assert saved and saved.keys() <= got.keys()
    assert all(torch.equal(got[k], t.float()) for k, t in saved.items())
    lm = save_lm(tmp_path / "lm", bpe_tokenizer(), hidden=32, layers=2, seed=1)
    m = VLM.from_backbones(path, lm)
    assert (m.config.vision_feature_layer, m.config.vision_feature_select_strategy) == (-1, "default")
    assert m.image_processor.to_dict() == AutoImageProcessor.from_pretrained(path).to_dict()
    # and so a backbones student may take TAF from that LLaVA teacher
    data = write_llava(tmp_path / "data.json", ["image"] * 4)
    out = str(tmp_path / "dpt")
    stage_main(dict(stage="dpt", kd_weight=1.0, taf=True), [
        "--init_from=backbones", f"--vision_model={path}", f"--llm_model={lm}", f"--teacher={path}", f"--data={data}",
        f"--out_dir={out}", "--batch_size=2", "--max_steps=1", "--eval_interval=0", "--max_length=96",
        "--student_layers=[0, 1]", "--teacher_layers=[0, 1]"])
    s = VLM.from_pretrained(out)
    assert s.config.taf and all(torch.equal(s.vision_tower.state_dict()[k], t.float()) for k, t in saved.items())


def test_taf_refusal_says_what_differs_and_what_to_do():
    from conftest import tiny_vlm
    t = tiny_vlm(seed=0)
    s = tiny_vlm(seed=1, vision_tower=t.vision_tower, hidden=48)
    s.config.vision_feature_layer = -1
    with pytest.raises(ValueError, match=r"TAF needs the teacher's vision tower: the student reads feature layer -1, "
                                         r"the teacher -2; .*init_from=scratch with the teacher"):
        TeacherStudent(t, s, VATSettings([0], [0])).apply_taf()


def test_our_checkpoints_shard_and_keep_tied_weights(tmp_path):
    torch.manual_seed(0)
    m = VLM(VLMConfig(vision=vision_cfg(), llm=dict(llm_cfg(), tie_word_embeddings=True), image_token_id=3)).eval()
    ids = torch.tensor([[5, 3, 3, 3, 3, 7, 8]])
    pv = torch.randn(1, 3, 16, 16)
    want = m(ids, torch.ones_like(ids), pv)["logits"]
    m.save_pretrained(str(tmp_path / "sharded"), max_shard_bytes=40_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert find_checkpoint(str(tmp_path / "sharded")) == str(tmp_path / "sharded")
    # a checkpoint that stores the tied weight under the head's name (as safetensors' save_model writes it)
    (tmp_path / "old").mkdir()
    m.config.save(str(tmp_path / "old"))
    save_model(m, str(tmp_path / "old" / "model.safetensors"))
    assert "llm.model.embed_tokens.weight" not in load_file(str(tmp_path / "old" / "model.safetensors"))
    for d in ("sharded", "old"):
        m2 = VLM.from_pretrained(str(tmp_path / d)).eval()
        assert m2.llm.lm_head.weight is m2.llm.model.embed_tokens.weight  # one parameter, still tied
        assert torch.equal(m2(ids, torch.ones_like(ids), pv)["logits"], want)


# -- damaged files: one line that names the file ---------------------------------------------------------------------

def damage(path, how):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncated": data[:len(data) // 2], "garbage": b"<html>not found</html>" * 8, "empty": b"",
                 "binary": bytes(range(256)) * 4}[how])


def tiny_checkpoint(path, shard_bytes=None):
    from conftest import tiny_vlm
    tiny_vlm().save_pretrained(str(path), max_shard_bytes=shard_bytes)
    return str(path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "binary"])
def test_damaged_weights_name_the_file(how, tmp_path):
    d = tiny_checkpoint(tmp_path / "ckpt")
    damage(os.path.join(d, "model.safetensors"), how)
    with pytest.raises(ValueError) as e:
        VLM.from_pretrained(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}/model.safetensors: cannot read the weights (") and "\n" not in msg
    assert msg.endswith("copy or download the checkpoint again, or rerun the stage that wrote it")
    # a LLaVA directory's shard and its index, through evaluate.py's loader
    d = tiny_checkpoint(tmp_path / "sharded", shard_bytes=40_000)
    shard = sorted(f for f in os.listdir(d) if f.startswith("model-"))[1]
    damage(os.path.join(d, shard), how)
    with pytest.raises(ValueError, match=rf"^{d}/{shard}: cannot read the weights \("):
        ev._load(d)
    damage(os.path.join(d, "model.safetensors.index.json"), how)
    with pytest.raises(ValueError, match=rf"^{d}/model.safetensors.index.json: not (valid JSON|UTF-8 text) \("):
        ev._load(d)
    damage(os.path.join(d, "config.json"), how)
    with pytest.raises(ValueError, match=rf"^{d}/config.json: not (valid JSON|UTF-8 text) \("):
        ev._load(d)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_damaged_train_state_names_the_file(how, tmp_path):
    out = tiny_checkpoint(tmp_path / "run")
    torch.save({"step": 1, "optimizer": {"state": {i: torch.zeros(64) for i in range(8)}}}, f"{out}/train_state.pt")
    damage(f"{out}/train_state.pt", how)
    with pytest.raises(ValueError) as e:
        stage_main(dict(stage="sft"), [f"--out_dir={out}", f"--init_from={out}", "--data=unused.json"])
    msg = str(e.value)
    assert msg.startswith(f"{out}/train_state.pt: cannot read the training state (") and "\n" not in msg
    assert msg.endswith(f"to start this stage over instead, move {out} away")


def _fill_disk(monkeypatch, where, error, free=10 * 2**20):
    """Make the writer `where` ("weights": safetensors, "state": torch.save) write half its file and fail with
    `error`, as a full disk makes it; the disk then reports `free` bytes left."""
    import checkpoint
    real = {"weights": checkpoint.save_file, "state": torch.save}[where]

    def half_then_fail(obj, path, *a, **k):
        real(obj, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise error
    if where == "weights":
        monkeypatch.setattr(checkpoint, "save_file", half_then_fail)
    else:
        monkeypatch.setattr(torch, "save", half_then_fail)
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=free))


@pytest.mark.parametrize("where, error", [
    ("weights", OSError(28, "No space left on device")),
    ("state", OSError(28, "No space left on device")),
    # what torch.save says on a full disk: nothing about the disk (then the free space tells)
    ("state", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1472")),
    ("weights", __import__("safetensors").SafetensorError("Error while serializing: I/O error: No space left on "
                                                          "device (os error 28)")),
])
def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(where, error, tmp_path, monkeypatch):
    """The save stops with one line that says the disk is full, where, and the room a save needs (two checkpoints:
    the new one is written before the old one goes); the partial <out_dir>.tmp is removed (its space back); the
    previous checkpoint stays whole and loads."""
    from checkpoint import save_checkpoint
    from conftest import tiny_vlm
    out = str(tmp_path / "run")
    model = tiny_vlm()
    state = {"step": 1, "optimizer": {"m": torch.ones(1000)}}
    save_checkpoint(out, model, state, [{"step": 1}])
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    _fill_disk(monkeypatch, where, error, free=0 if isinstance(error, RuntimeError) else 10 * 2**20)
    with pytest.raises(ValueError) as e:
        save_checkpoint(out, model, dict(state, step=2), [{"step": 1}, {"step": 2}])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"out_dir={out}: the disk is full: the checkpoint could not be written to "
                                              f"{out}.tmp (")
    free = "0 B" if isinstance(error, RuntimeError) else "10.0 MiB"
    need = f"{2 * size / 2**20:.1f} MiB" if 2 * size >= 2**20 else f"{2 * size / 2**10:.1f} KiB"
    assert msg.endswith(f"{free} free there; a save needs room for two checkpoints (the new one is written before "
                        f"the old one is removed), about {need} here. Free some space, or choose an out_dir on a "
                        f"disk with room; the previous checkpoint in {out} is intact"), msg
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")
    monkeypatch.undo()
    assert torch.load(os.path.join(out, "train_state.pt"), weights_only=False)["step"] == 1
    assert VLM.from_pretrained(out) is not None


def test_another_write_error_during_a_save_keeps_its_traceback_and_cleans_up(tmp_path, monkeypatch):
    from checkpoint import save_checkpoint
    from conftest import tiny_vlm
    out = str(tmp_path / "run")
    _fill_disk(monkeypatch, "state", RuntimeError("something else"), free=2**40)
    with pytest.raises(RuntimeError, match="something else"):
        save_checkpoint(out, tiny_vlm(), {"step": 1}, [])
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out)


@pytest.mark.slow
def test_damaged_files_through_the_command_line(tmp_path):
    """The real scripts: exit 2 and one line on stderr, no traceback."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tiny_checkpoint(tmp_path / "ckpt")
    damage(os.path.join(d, "model.safetensors"), "truncated")
    out = tiny_checkpoint(tmp_path / "run")
    damage(os.path.join(out, "model.safetensors"), "empty")
    open(os.path.join(out, "train_state.pt"), "wb").close()
    for script, argv, first in [("evaluate.py", [f"--model={d}", f"--data={tmp_path}"], f"{d}/model.safetensors"),
                                ("train_sft.py", [f"--out_dir={out}"], f"{out}/train_state.pt")]:
        r = subprocess.run([sys.executable, script, *argv], cwd=root, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.startswith(f"{script}: {first}: cannot read") and len(r.stderr.strip().splitlines()) == 1


# -- export ----------------------------------------------------------------------------------------------------------

def student(tmp_path, tower="siglip", arch="qwen2", bos=False, hidden=32, teacher_hidden=None, tie=False):
    """A random student with a BPE tokenizer (+ <image>) and its tower's image processor; with teacher_hidden, a TAF
    student of a teacher that wide (the teacher's connector, frozen, and a random post_connector); tie: its LM head
    shares the input embedding (as the shapes students' do)."""
    from transformers import CLIPImageProcessorPil
    tok = prepare_tokenizer(bpe_tokenizer(bos=bos))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = dict(vision_cfg(), model_type="clip_vision_model") if tower == "clip" else vision_cfg()
    proc = (CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
            if tower == "clip" else image_processor(16))

    def vlm(width, seed, tower=None):
        torch.manual_seed(seed)
        llm = dict(llm_cfg(arch, hidden=width, layers=2), vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                   bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=tie)
        m = VLM(VLMConfig(vision=vision, llm=llm, image_token_id=tok.convert_tokens_to_ids("<image>")),
                vision_tower=tower)
        m.tokenizer, m.image_processor = tok, proc
        return m.eval()
    s = vlm(hidden, 1)
    if teacher_hidden:
        t = vlm(teacher_hidden, 0)
        s.vision_tower = t.vision_tower
        TeacherStudent(t, s, VATSettings(student_layers=[0], teacher_layers=[0])).apply_taf()
    path = str(tmp_path / "student")
    s.save_pretrained(path)
    return s, path


EXPORT_CASES = {"plain_siglip_qwen2": dict(), "plain_tied_siglip_qwen2": dict(tie=True),
                "taf_narrower_clip_llama": dict(tower="clip", arch="llama", bos=True, teacher_hidden=24),
                "taf_as_wide_siglip_qwen2": dict(teacher_hidden=32)}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_loads_in_transformers_with_our_logits_prompt_and_generation(case, tmp_path):
    from transformers import AutoProcessor
    ours, path = student(tmp_path, **EXPORT_CASES[case])
    out = export(path, str(tmp_path / "hf"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["image_token_index"] == ours.image_token_id and cfg["image_seq_length"] == ours.num_image_tokens == 4
    assert cfg["tie_word_embeddings"] == ("tied" in case)
    hf, proc = hf_llava(out), AutoProcessor.from_pretrained(out)
    assert (hf.lm_head.weight is hf.get_input_embeddings().weight) == ("tied" in case)
    img = picture(1)

    # the processor's chat template writes our training prompt, token for token (BOS only where the tokenizer adds it)
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTION}]}]
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    assert inputs.input_ids.tolist() == prompt_ids(ours).tolist()
    assert (inputs.input_ids[0, 0] == ours.tokenizer.bos_token_id) == (case == "taf_narrower_clip_llama")
    assert torch.equal(inputs.pixel_values, pixels(ours, img))
    turns = [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "describe the image ."}]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": "describe the image ."}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    assert proc(text=text, images=img).input_ids[0] == tokenize_conversation(turns, ours.tokenizer, 4, True)[0]
    # lmms-eval's llava_hf way: the tokenizer's template on a string holding "<image>", then the processor
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + QUESTION}], tokenize=False,
                                              add_generation_prompt=True)
    assert proc(text=text, images=img).input_ids[0] == prompt_ids(ours)[0].tolist()

    if ours.config.taf:  # folded: the teacher's connector width, zero-padded to the LM's
        d_t = ours.config.teacher_hidden_size
        W1 = hf.model.multi_modal_projector.linear_1.weight
        assert W1.shape[0] == 32 and (W1[d_t:] == 0).all() and torch.equal(W1[:d_t], ours.connector[0].weight)
    # logits and greedy generation (with the exported generation config: greedy, the image token suppressed)
    diff, mine, theirs = against_transformers(ours, hf, inputs.input_ids, inputs.pixel_values)
    print(f"{case}: export vs ours, max |logit diff| = {diff:.3g}")
    assert diff <= TOL and mine == theirs

    # round trip: export -> import -> export writes the same directory
    again = VLM.from_pretrained(out).eval()
    with torch.no_grad():
        back = (again(inputs.input_ids, inputs.attention_mask, inputs.pixel_values)["logits"]
                - ours(inputs.input_ids, inputs.attention_mask, inputs.pixel_values)["logits"]).abs().max()
    assert back <= TOL
    out2 = export(again, str(tmp_path / "hf2"))
    a, b = read_weights(out), read_weights(out2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("config.json", "generation_config.json", "chat_template.jinja", "processor_config.json"):
        assert open(os.path.join(out, f)).read() == open(os.path.join(out2, f)).read(), f


def test_export_keeps_the_distilled_layer_pairs(tmp_path):
    """evaluate.py --tasks=align on an export measures the pairs the student was distilled on, not the presets."""
    import alignment
    ours, _ = student(tmp_path, teacher_hidden=24)
    distill = {"student_layers": [1], "teacher_layers": [0, 1], "matching": "simple"}
    ours.config.extra = {"stage": "sft", "distill": distill}
    out = export(ours, str(tmp_path / "hf"))
    hf_llava(out)  # transformers still loads it as it is
    back = VLM.from_pretrained(out)
    assert back.config.extra["distill"] == distill
    teacher = VLM(VLMConfig(vision=vision_cfg(), llm=llm_cfg(hidden=24, layers=2, heads=2, kv_heads=1),
                            image_token_id=back.image_token_id), vision_tower=back.vision_tower)
    # simple matching, one student layer: student layer 1 <- teacher layer 0 (T[floor(0 * 2 / 1)])
    assert alignment.matched_layers(back, teacher) == LayerPairs(student=[1], teacher=[0, 1], windows=[[0]])
    export(back, str(tmp_path / "hf2"))  # and the next export keeps them
    assert open(os.path.join(out, "config.json")).read() == open(tmp_path / "hf2" / "config.json").read()


def test_export_refuses_a_taf_student_of_a_wider_teacher(tmp_path):
    import export_hf
    _, path = student(tmp_path, teacher_hidden=48)
    with pytest.raises(ValueError, match=r"cannot be written as a Hugging Face LLaVA directory.*\(48 > 32 here\).*"
                                         r"export refuses.*evaluate\.py, sample\.py.*at least as wide.*taf=False"):
        export_hf.main([f"--model={path}", f"--out={tmp_path / 'hf'}"])
    assert not os.path.exists(tmp_path / "hf")  # nothing written


def test_export_refuses_to_write_over_a_checkpoint(tmp_path):
    """--out=<the checkpoint itself> replaced its weights with the LLaVA ones in place: refused, nothing written; so is
    a folder inside it (a later save of its run replaces the directory) and another of our checkpoints."""
    import export_hf
    d = tiny_checkpoint(tmp_path / "ckpt")
    other = tiny_checkpoint(tmp_path / "other")
    before = {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}
    for out, why in [(d, "is the checkpoint being exported"), (d + "/", "is the checkpoint being exported"),
                     (os.path.join(d, "hf"), "lies inside the checkpoint being exported"),
                     (other, "holds a CompoDistill checkpoint")]:
        with pytest.raises(ValueError) as e:
            export_hf.main([f"--model={d}", f"--out={out}"])
        assert str(e.value).startswith(f"--out={out} {why}") and "\n" not in str(e.value)
        assert str(e.value).endswith(f"choose another --out (the default is {d}_hf)")
    assert {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))} == before
    assert not os.path.exists(os.path.join(d, "hf")) and VLM.from_pretrained(other) is not None
