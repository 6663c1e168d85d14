"""
    python -m pytest -q tests/test_run_data.py

run_data.py through short runs on LLaVA files with missing images and text-only rows: the data checked before
training, and what the loader dropped and cut, counted once per sample.
"""
import json
import os

import pytest
import torch

from conftest import SFT, run, run_stage, write_layout, write_llava


# -- a run that would train on nothing --------------------------------------------------------------------------

def test_wrong_image_folder_stops_before_training(hf, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(ValueError) as e:
        run("sft", init_from=hf["dpt"], data=hf["data"], image_folder=str(tmp_path / "nowhere"), out_dir=out)
    msg = str(e.value)
    assert msg.startswith(f"{hf['data']}: 6 of 8 samples read cannot be used ({{'missing_image': 6}})")
    assert str(tmp_path / "nowhere" / "images" / "0.png") in msg
    assert not os.path.exists(out)


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
