"""
    python -m pytest -q tests/test_checkpoint.py

checkpoint.py's writes on a tiny shapes world: a save killed midway leaves the previous checkpoint, which loads.
"""
import os

import pytest
import torch

from checkpoint import find_checkpoint
from conftest import SFT, run_stage, weights
from model import VLM


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
