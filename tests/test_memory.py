"""
    python -m pytest -q tests/test_memory.py

memory.py's estimate against what it estimates: the tiny preset's models as bench.py builds them for DFT, the
gradients and AdamW states of one real step on them, LoRA's adapters as run_models.add_lora puts them; and the documented
command.
"""
import pytest
import torch

import bench
import memory
from run_models import add_lora, set_trainable

P = bench.PRESETS["tiny"]


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def step(ts):
    """One DFT step with AdamW on what trains: (the gradients' bytes, AdamW's two states' bytes), counted."""
    train = [x for x in ts.student.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(train)
    ts(bench.make_batch(P, ts.student.num_image_tokens, torch.device("cpu")))["total"].backward()
    opt.step()
    return (nbytes(x.grad for x in train),
            nbytes(v for s in opt.state.values() for k, v in s.items() if k != "step"))


def test_parameter_counts_gradients_and_optimizer_state_are_those_of_the_built_models():
    c = memory.param_counts(P)
    ts = bench.build(P, torch.device("cpu"))  # teacher and student sharing a tower, TAF, the student set up for DFT
    n = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    assert c["t_layers"] + c["t_lm_rest"] == n(ts.teacher.llm) and c["t_tower"] == n(ts.teacher.vision_tower)
    assert c["s_layers"] + c["s_lm_rest"] == n(ts.student.llm) and c["s_tower"] == n(ts.student.vision_tower)
    assert c["s_layer"] == n(ts.student.llm.model.layers[0]) and c["post_connector"] == n(ts.student.post_connector)
    grads, states = step(ts)
    ddp = memory.memory_estimate(P, "ddp", ckpt=True)  # DDP, full fine-tuning: every rank holds them all
    assert ddp["grads"] * memory.GIB == pytest.approx(grads, rel=1e-12)
    assert ddp["optimizer"] * memory.GIB == pytest.approx(states, rel=1e-12)
    assert ddp["total"] == pytest.approx(sum(v for k, v in ddp.items() if k != "total"))


def test_lora_counts_are_those_of_the_adapters_stages_adds():
    rank = 8
    c = memory.param_counts(P, rank=rank)
    ts = bench.build(P, torch.device("cpu"))
    add_lora(ts.student, rank=rank)
    set_trainable(ts.student, train_llm=True)
    assert c["lora"] == sum(x.numel() for name, x in ts.student.named_parameters() if ".lora_" in name)
    grads, states = step(ts)  # the adapters and the post_connector train
    lora = memory.memory_estimate(P, "ddp_lora", ckpt=True, rank=rank)
    assert lora["grads"] * memory.GIB == pytest.approx(grads, rel=1e-12)
    assert lora["optimizer"] * memory.GIB == pytest.approx(states, rel=1e-12)


def test_the_documented_command_prints_every_setup(capsys):
    """python memory.py --preset=...: one row per setup, with and without gradient checkpointing."""
    text = memory.main(["--preset=tiny", "--world=4"])
    assert capsys.readouterr().out == text + "\n"
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| setup")]
    assert [r.split(" | ")[0:2] for r in rows] == [[f"| {name}", ckpt] for name in (
        "DDP, full fine-tuning", "DDP + LoRA r128", "FSDP, 4 GPUs", "FSDP + LoRA r128, 4 GPUs") for ckpt in ("no", "yes")]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        memory.main(["--preset=huge"])
