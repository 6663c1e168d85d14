"""python -m pytest -q tests/test_stages.py

The three stages end to end on a tiny shapes world: hand-off, trainable sets, resume, crash safety, presets.
(DDP against one process: tests/test_parallel.py.)"""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import shapes
import shapes_tower
import run as runner
import train_dft
import train_dpt
import train_sft
from conftest import stage_main, stage_train, training_defaults
from checkpoint import find_checkpoint
from model import VLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=24, patch_size=8)  # 9 visual tokens (24 px world, 3x3 grid)


def llm(hidden, layers):
    return dict(model_type="qwen2", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def args(d):
    return [f"--{k}={v}" for k, v in d.items()]


def run_stage(script_defaults, **kw):
    base = dict(batch_size=2, max_steps=2, log_interval=1, eval_interval=0, save_interval=100, lr=1e-3,
                max_length=64, warmup_frac=0.0)
    return stage_main(script_defaults, args({**base, **kw}))


SFT = dict(stage="sft", kd_weight=0.0, vat_weight=0.0)
DPT = dict(stage="dpt", kd_weight=1.0, vat_weight=0.0, taf=True)
DFT = dict(stage="dft", kd_weight=1.0, vat_weight=1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, a 2-step teacher and a 2-step DPT student, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("stages")
    data = root / "shapes"
    shapes.generate(str(data), n_train=24, n_test=4, image_size=24, progress=False)
    d = dict(pretrain=str(data / "pretrain.json"), instruct=str(data / "instruct.json"),
             teacher=str(root / "teacher"), dpt=str(root / "dpt"), root=root)
    d["tower"] = str(data / "vision_tower")
    shapes_tower.pretrain_tower(str(data), d["tower"], vision=VISION, steps=2, batch_size=4, progress=False)
    run_stage(SFT, init_from="scratch", data=d["pretrain"] + "," + d["instruct"], out_dir=d["teacher"],
              vision_model=d["tower"], llm=llm(48, 4))
    run_stage(DPT, init_from="scratch", teacher=d["teacher"], data=d["pretrain"], out_dir=d["dpt"],
              llm=llm(32, 2), student_layers=[0, 1], teacher_layers=[1, 2, 3])
    return d


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def changed(a, b):
    return sorted({k.split(".")[0] if not k.startswith("llm.") else "llm" for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])})


@pytest.fixture(scope="module")
def chain(world):
    """DFT from the fixture's DPT student, then SFT from that DFT, recording which directories each stage loads."""
    loaded, real = {}, VLM.from_pretrained.__func__
    root = world["root"]
    with pytest.MonkeyPatch.context() as mp:
        for stage, kw in (("dft", dict(init_from=world["dpt"], teacher=world["teacher"], student_layers=[0, 1],
                                       teacher_layers=[1, 2, 3])),
                          ("sft", dict(init_from=str(root / "dft")))):
            seen = loaded.setdefault(stage, [])
            mp.setattr(VLM, "from_pretrained", classmethod(lambda cls, p, seen=seen, **k: seen.append(p) or real(cls, p, **k)))
            run_stage(DFT if stage == "dft" else SFT, data=world["instruct"], out_dir=str(root / stage), **kw)
    return dict(loaded=loaded, dft=str(root / "dft"), sft=str(root / "sft"))


def test_dpt_student_sees_through_the_teachers_frozen_connector_and_tower(world):
    teacher, dpt = weights(world["teacher"]), VLM.from_pretrained(world["dpt"])
    assert dpt.config.taf and dpt.config.extra["stage"] == "dpt" and dpt.config.extra["step"] == 2
    shared = [k for k in dpt.state_dict() if k.startswith(("connector.", "vision_tower."))]
    assert shared and all(torch.equal(dpt.state_dict()[k], teacher[k]) for k in shared)


def test_dft_trains_the_lm_and_post_connector_with_the_teacher(world, chain):
    assert changed(weights(world["dpt"]), weights(chain["dft"])) == ["llm", "post_connector"]
    assert world["teacher"] in chain["loaded"]["dft"]
    log = [json.loads(line) for line in open(os.path.join(chain["dft"], "train_log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2] and all(r["vat"] > 0 for r in log)


def test_sft_never_loads_the_teacher_and_keeps_the_layer_pairs(chain):
    assert chain["loaded"]["sft"] == [chain["dft"]]
    assert changed(weights(chain["dft"]), weights(chain["sft"])) == ["llm", "post_connector"]
    # the distillation layer pairs travel with the SFT checkpoint (evaluate.py measures alignment there)
    assert VLM.from_pretrained(chain["sft"]).config.extra["distill"] == \
        {"student_layers": [0, 1], "teacher_layers": [1, 2, 3], "matching": "group"}


def test_everyone_sees_through_the_pretrained_tower(world):
    """The teacher (init_from=scratch + vision_model) and the students it makes all carry the pretrained tower."""
    tower = load_file(os.path.join(world["tower"], "model.safetensors"))
    for path in (world["teacher"], world["dpt"]):
        w = weights(path)
        assert all(torch.equal(w["vision_tower." + k], v) for k, v in tower.items()), path


def test_dpt_trains_post_connector_only(world):
    # two one-step DPT runs from the same new student (same seed), one at lr 0: only the post_connector differs,
    # so nothing else trains in DPT (the LM, the tower and the TAF connector stay as built)
    root = world["root"]
    run_stage(DPT, init_from="scratch", teacher=world["teacher"], data=world["pretrain"], out_dir=str(root / "dpt0"),
              llm=llm(32, 2), student_layers=[0, 1], teacher_layers=[1, 2, 3], max_steps=1, lr=0.0)
    run_stage(DPT, init_from="scratch", teacher=world["teacher"], data=world["pretrain"], out_dir=str(root / "dpt1"),
              llm=llm(32, 2), student_layers=[0, 1], teacher_layers=[1, 2, 3], max_steps=1, lr=1e-2)
    assert changed(weights(root / "dpt0"), weights(root / "dpt1")) == ["post_connector"]


def test_resume_is_bit_exact(world):
    root = world["root"]
    common = dict(init_from=world["dpt"], data=world["instruct"], max_steps=6, lr=1e-3, warmup_frac=0.3)
    run_stage(SFT, out_dir=str(root / "straight"), **common)
    run_stage(SFT, out_dir=str(root / "resumed"), stop_after=3, **common)
    assert torch.load(root / "resumed" / "train_state.pt", weights_only=False)["step"] == 3
    run_stage(SFT, out_dir=str(root / "resumed"), **common)
    a, b = weights(root / "straight"), weights(root / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(root / "straight" / "train_state.pt", weights_only=False)
    sb = torch.load(root / "resumed" / "train_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 6
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


def test_killed_write_leaves_previous_checkpoint(world, monkeypatch):
    root = world["root"]
    out = str(root / "crash")
    common = dict(init_from=world["dpt"], data=world["instruct"], out_dir=out, max_steps=4, save_interval=2)
    run_stage(SFT, stop_after=2, **common)
    good = weights(out)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage(SFT, **common)
    assert find_checkpoint(out) == out
    after = weights(out)
    assert all(torch.equal(good[k], after[k]) for k in good)  # the step-2 checkpoint is intact
    assert os.path.isdir(out + ".tmp")  # the half-written one never took its place
    # killed between the two renames: only out.old exists, and it is what loads
    os.rename(out, out + ".old")
    assert find_checkpoint(out) == out + ".old"
    old = VLM.from_pretrained(out)  # reads out.old
    assert all(torch.equal(v, good[k]) for k, v in old.state_dict().items() if k in good)


def script_of(config_file):
    """The stage script a preset is for: a teacher's is train_sft.py's (SFT's script trains teachers too)."""
    name = os.path.basename(config_file)
    stage = "sft" if "teacher" in name else name.removesuffix(".py").rsplit("_", 1)[1]
    return {"dpt": train_dpt, "dft": train_dft, "sft": train_sft}[stage]


def resolved(config_files):
    mod = script_of(config_files[-1])
    return runner.configure_stage(mod.DEFAULTS, config_files, "", mod.__file__)


def test_a_stage_script_without_arguments_runs_its_shapes_preset():
    """One recipe per command: `python train_X.py` trains what `python train_X.py config/shapes_X.py` does (the
    preset changes nothing), into the same out_dir; the stages' out_dirs differ."""
    outs = set()
    for mod, stage in ((train_dpt, "dpt"), (train_dft, "dft"), (train_sft, "sft")):
        bare = runner.configure_stage(mod.DEFAULTS, [], "", mod.__file__)
        assert bare == resolved([os.path.join(ROOT, "config", f"shapes_{stage}.py")])
        assert bare["stage"] == stage and bare["out_dir"] == f"out/shapes/{stage}"
        outs.add(bare["out_dir"])
    assert len(outs) == 3


def test_a_stage_script_takes_every_form_of_a_setting_and_only_its_own_stage():
    """A stage's own default does not narrow a setting's type (DFT's student_layers=[1, 2] still takes a depth name or
    None, DPT's train_llm=True still None), and a script refuses another stage's name: that is another script."""
    c = runner.configure_stage(train_dft.DEFAULTS, ["--student_layers=late", "--teacher_layers=None"], "",
                               train_dft.__file__)
    assert (c["student_layers"], c["teacher_layers"]) == ("late", None)
    assert runner.configure_stage(train_dpt.DEFAULTS, ["--train_llm=None"], "", train_dpt.__file__)["train_llm"] is None
    with pytest.raises(ValueError, match="^config key 'lr' .* expects float"):
        runner.configure_stage(train_dft.DEFAULTS, ["--lr=fast"], "", train_dft.__file__)
    with pytest.raises(ValueError, match=r"^stage=dpt: train_dft.py runs stage dft; run train_dpt.py for that one"):
        runner.configure_stage(train_dft.DEFAULTS, ["--stage=dpt"], "", train_dft.__file__)


def test_the_presets_chain_stage_to_stage():
    """Every preset passes the config checks (the hard world's layered over the default world's); each writes its own
    out_dir; each init_from / teacher that is a directory is another preset's out_dir (the hand-off a reader follows:
    teacher -> DPT -> DFT -> SFT)."""
    def files(f):
        base = f.replace("shapes_hard_", "shapes_")
        return [os.path.join(ROOT, "config", g) for g in ([base, f] if base != f else [f])]
    cfgs = {f: resolved(files(f))
            for f in sorted(os.listdir(os.path.join(ROOT, "config"))) if f.endswith(".py")}
    outs = [c["out_dir"] for c in cfgs.values()]
    assert len(set(outs)) == len(outs)
    for f, c in cfgs.items():
        for key in ("init_from", "teacher"):
            if c[key] and c[key] not in ("scratch", "backbones"):
                assert c[key] in outs, (f, key, c[key])


def test_the_paper_presets_state_their_rate_hold_out_and_workers(tmp_path):
    """config/qwen15_*.py: full fine-tuning in DFT / SFT at LLaVA-1.5's full fine-tuning rate (2e-5), the LoRA lines
    with their own rate (the reference's 2e-4); a small stated hold-out and image decoding in worker processes."""
    for f in sorted(os.listdir(os.path.join(ROOT, "config"))):
        if not f.startswith("qwen15_"):
            continue
        path = os.path.join(ROOT, "config", f)
        c = resolved([path])
        assert c["num_workers"] >= 2 and 0 < c["val_frac"] <= 0.002, f
        if f in ("qwen15_dft.py", "qwen15_sft.py"):
            assert c["lr"] == 2e-5 and c["lora_rank"] == 0, f
            # the commented LoRA block, switched on, brings the LoRA rate with it
            lines = open(path).read().splitlines()
            start = next(i for i, l in enumerate(lines) if l.startswith("# LoRA"))
            block = [l[2:] if l.startswith("# ") and "=" in l.split("#")[1] else l for l in lines[start:]]
            lora = tmp_path / f"lora_{f}"
            lora.write_text("\n".join(lines[:start] + block))
            c = runner.configure_stage(script_of(path).DEFAULTS, [str(lora)], "", path)
            assert (c["lora_rank"], c["lr"]) == (128, 2e-4), f


def test_the_validation_hold_out_is_said_at_start_up(world, capsys):
    """How many samples are held out for validation, and from which file."""
    root = world["root"]
    files = [world["pretrain"], world["instruct"]]
    sizes = [len(json.load(open(p))) for p in files]
    run_stage(SFT, init_from=world["dpt"], data=",".join(files), out_dir=str(root / "val_log"), eval_interval=2,
              val_frac=0.25, max_steps=1)
    n_val = int(0.25 * sum(sizes))
    held = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(1234))[:n_val]
    first = int((held < sizes[0]).sum())
    assert (f"validation: {n_val} samples held out of the training data (val_frac=0.25): {first} of {files[0]}, "
            f"{n_val - first} of {files[1]}") in capsys.readouterr().out
    run_stage(SFT, init_from=world["dpt"], data=world["pretrain"], val_data=world["instruct"],
              out_dir=str(root / "val_log2"), eval_interval=2, max_steps=1)
    assert f"validation: the {sizes[1]} samples of val_data={world['instruct']}" in capsys.readouterr().out


@pytest.mark.parametrize("bad, says", [(dict(save_interval=0), "save_interval=0: must be at least 1"),
                                       (dict(grad_accum=0), "grad_accum=0: must be at least 1"),
                                       (dict(batch_size=-2), "batch_size=-2: must be at least 1"),
                                       (dict(lr=-1e-3), "lr=-0.001: must be at least 0"),
                                       (dict(val_frac=1.0), "val_frac=1.0"),
                                       (dict(vat_loss="l1"), "unknown vat_loss 'l1'"),
                                       (dict(kd_weight=1.0), "stage sft loads no teacher, so kd_weight=1.0"),
                                       (dict(taf=True), "stage sft loads no teacher, so taf=True")])
def test_settings_that_cannot_work_are_refused_before_anything_is_built(bad, says, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "compute_init", lambda **kw: pytest.fail("got past the settings check"))
    cfg = training_defaults(stage="sft", out_dir=str(tmp_path / "o"), **bad)
    with pytest.raises(ValueError, match=f"^{re.escape(says)}"):
        stage_train(cfg)
