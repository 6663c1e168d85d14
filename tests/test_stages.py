"""The three stages end to end on a tiny shapes world: hand-off, trainable sets, DDP, resume, crash safety."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import shapes
import trainer
from model import VLM, find_checkpoint

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
    return trainer.main(script_defaults, args({**base, **kw}))


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
    shapes.pretrain_tower(str(data), d["tower"], vision=VISION, steps=2, batch_size=4, progress=False)
    run_stage(SFT, init_from="scratch", data=d["pretrain"] + "," + d["instruct"], out_dir=d["teacher"],
              vision_model=d["tower"], llm=llm(48, 4))
    run_stage(DPT, init_from="scratch", teacher=d["teacher"], data=d["pretrain"], out_dir=d["dpt"],
              llm=llm(32, 2), student_layers=[0, 1], teacher_layers=[1, 2, 3])
    return d


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def changed(a, b):
    return sorted({k.split(".")[0] if not k.startswith("llm.") else "llm" for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])})


def test_stage_handoff_and_trainable_sets(world, monkeypatch):
    teacher, dpt = weights(world["teacher"]), VLM.from_pretrained(world["dpt"])
    # DPT (TAF): the student's connector is the teacher's, its tower too; only post_connector trained
    assert dpt.config.taf and dpt.config.extra["stage"] == "dpt" and dpt.config.extra["step"] == 2
    for k, v in dpt.state_dict().items():
        if k.startswith(("connector.", "vision_tower.")):
            assert torch.equal(v, teacher[k]), k
    fresh = dict(dpt.state_dict())
    before = {k: v.clone() for k, v in fresh.items()}

    loaded = []
    real = VLM.from_pretrained.__func__
    monkeypatch.setattr(VLM, "from_pretrained", classmethod(lambda cls, p, **kw: loaded.append(p) or real(cls, p, **kw)))
    root = world["root"]
    run_stage(DFT, init_from=world["dpt"], teacher=world["teacher"], data=world["instruct"], out_dir=str(root / "dft"),
              student_layers=[0, 1], teacher_layers=[1, 2, 3])
    dft = weights(root / "dft")
    assert changed(before, dft) == ["llm", "post_connector"]  # not the tower, not the TAF connector
    assert world["teacher"] in loaded

    loaded.clear()
    run_stage(SFT, init_from=str(root / "dft"), data=world["instruct"], out_dir=str(root / "sft"))
    assert loaded == [str(root / "dft")]  # SFT never loads the teacher
    # the distillation layer pairs travel with the SFT checkpoint (evaluate.py measures alignment there)
    assert VLM.from_pretrained(str(root / "sft")).config.extra["distill"] == \
        {"student_layers": [0, 1], "teacher_layers": [1, 2, 3], "matching": "group"}
    sft = weights(root / "sft")
    assert changed(dft, sft) == ["llm", "post_connector"]
    log = [l for l in open(root / "dft" / "train_log.jsonl")]
    assert len(log) == 2 and '"vat"' in log[0]


def test_everyone_sees_through_the_pretrained_tower(world):
    """The teacher (init_from=scratch + vision_model) and the students it makes all carry the pretrained tower."""
    tower = load_file(os.path.join(world["tower"], "model.safetensors"))
    for path in (world["teacher"], world["dpt"]):
        w = weights(path)
        assert all(torch.equal(w["vision_tower." + k], v) for k, v in tower.items()), path


def test_dpt_trains_post_connector_only(world):
    # a second DPT run from the same scratch settings changes only post_connector vs its own init:
    # checked through the teacher copy (connector) and the step-0 vs step-2 difference of a 0-lr run
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
    assert VLM.from_pretrained(find_checkpoint(out)) is not None


def test_ddp_two_processes_equal_one_process_with_accumulation(world):
    """torchrun --nproc_per_node=2 (gloo) == one process with grad_accum=2; tolerance 1e-5 (reduction order)."""
    root = world["root"]
    common = dict(init_from=world["dpt"], teacher=world["teacher"], data=world["instruct"], max_steps=2,
                  batch_size=2, student_layers=[0, 1], teacher_layers=[1, 2, 3], eval_interval=0,
                  log_interval=1, save_interval=100, max_length=64, lr=1e-3, warmup_frac=0.0)
    run_stage(DFT, out_dir=str(root / "single"), grad_accum=2, **{k: v for k, v in common.items() if k != "batch_size"},
              batch_size=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as s:  # a free port: a fixed one hangs when two suites run at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "train_dft.py"), *args({**common, "out_dir": str(root / "ddp"), "grad_accum": 1})]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(root / "single"), weights(root / "ddp")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert any(not torch.equal(a[k], weights(world["dpt"])[k]) for k in a)  # training really moved the weights


@pytest.mark.parametrize("path", sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py")))
def test_every_preset_passes_the_config_checks(path):
    cfg = trainer.configure(dict(trainer.DEFAULTS), [os.path.join(ROOT, "config", path)])
    assert cfg.keys() == trainer.DEFAULTS.keys()
    assert cfg["init_from"] in ("scratch", "backbones") or cfg["init_from"].startswith("out/")
