"""
    python -m pytest -q tests/test_run.py

run.py's Run on tiny Hugging Face checkpoints: out_dir checks and its lock, the same-run rule on resume, resume on
another number of processes, float16's grad scaler, a step with no sample, signals.
"""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import run as runner
from conftest import (LAYERS, ROOT, SFT, run, run_stage, script_args, stage_train, training_defaults, weights,
                      write_layout, write_llava)


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
    (tests/test_parallel.py resumes real two-process checkpoints.)"""
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
