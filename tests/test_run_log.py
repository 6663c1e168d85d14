"""
    python -m pytest -q tests/test_run_log.py

run_log.py: the training log of a run with steps that had no sample (no losses logged for them; a record over
several steps averages the steps that had one).
"""
import pytest
import torch

import run_log
from conftest import run, write_layout


def test_a_step_without_any_sample_logs_no_losses(hf):
    """A skipped step has no loss: its log record leaves the loss terms out (None), where it logged 0 and loss curves
    dipped to zero; a record over steps with samples averages theirs alone."""
    root = hf["root"] / "skip_log"
    data = write_layout(root / "data.json", [["image"], ["missing"], ["image"], ["missing"]])
    run("sft", init_from=hf["dpt"], data=data, batch_size=1, max_steps=4, out_dir=str(root / "every"))
    log = torch.load(root / "every" / "train_state.pt", weights_only=False)["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [[r[k] is None for k in run_log.LOSSES] for r in log] == [[False] * 4, [True] * 4] * 2
    assert all(r["lm"] > 0 for r in log[::2])
    run("sft", init_from=hf["dpt"], data=data, batch_size=1, max_steps=4, log_interval=2, out_dir=str(root / "two"))
    pairs = torch.load(root / "two" / "train_state.pt", weights_only=False)["log"]
    assert [r["step"] for r in pairs] == [2, 4] and pairs[0]["lm"] == pytest.approx(log[0]["lm"], rel=1e-6)
