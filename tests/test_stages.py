"""
    python -m pytest -q tests/test_stages.py

The stage scripts' recipes (train_dpt.py, train_dft.py, train_sft.py) on a tiny shapes world: the hand-off from stage
to stage, what each stage trains and loads, one recipe per command, the presets. (Resume, settings checks: test_run.py;
DDP against one process: test_parallel.py.)
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import run as runner
import train_dft
import train_dpt
import train_sft
from conftest import DFT, DPT, ROOT, SFT, llm, run_stage, weights
from model import VLM


def changed(a, b):
    return sorted({k.split(".")[0] if not k.startswith("llm.") else "llm" for k in a.keys() & b.keys()
                   if not torch.equal(a[k], b[k])})


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
            mp.setattr(VLM, "from_pretrained",
                       classmethod(lambda cls, p, seen=seen, **k: seen.append(p) or real(cls, p, **k)))
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


