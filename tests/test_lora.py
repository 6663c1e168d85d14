"""
    python -m pytest -q tests/test_lora.py

LoRA (peft, optional): the trainable set, VAT through adapted attention, merged checkpoints, exact resume.
"""
import sys

import pytest
import torch

pytest.importorskip("peft")

from conftest import run, tiny_batch, tiny_pair, tiny_vlm, weights  # noqa: E402
from checkpoint import plain_state_dict  # noqa: E402
from run_models import add_lora, set_trainable  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_trains_the_adapters_and_the_trainable_connector_only():
    ts = tiny_pair()
    add_lora(ts.student, rank=4)
    set_trainable(ts.student, train_llm=True)
    got = sorted(n for n, p in ts.student.named_parameters() if p.requires_grad)
    want = sorted([f"llm.model.layers.{i}.{'self_attn' if m in LINEARS[:4] else 'mlp'}.{m}.lora_{ab}.default.weight"
                   for i in range(4) for m in LINEARS for ab in "AB"] + ["post_connector.bias", "post_connector.weight"])
    assert got == want  # every Linear of the decoder layers, not the LM head; nothing of the base LM


def test_vat_loss_and_gradients_through_zero_initialised_adapters():
    """B = 0 at the start: the adapted model computes what the plain one does. The VAT gradient reaches the
    adapters through the captured attention: dL/dB = scale * dL/dW @ A^T for W's adapter."""
    b = tiny_batch()
    plain = tiny_pair()
    set_trainable(plain.student, train_llm=True)
    plain.student.train()
    out = plain(b)
    out["vat"].backward()
    want = {n: p.grad.clone() for n, p in plain.student.named_parameters() if p.grad is not None}

    lora = tiny_pair()
    add_lora(lora.student, rank=4, dropout=0.0)
    set_trainable(lora.student, train_llm=True)
    lora.student.train()
    out_l = lora(b)
    out_l["vat"].backward()
    for k in ("lm", "kd", "vat"):
        torch.testing.assert_close(out_l[k], out[k])
    got = {n: p.grad for n, p in lora.student.named_parameters() if p.grad is not None}
    torch.testing.assert_close(got["post_connector.weight"], want["post_connector.weight"])
    for layer in (1, 2):  # the captured layers: VAT's gradient flows through their q and k
        for m in ("q_proj", "k_proj"):
            mod = lora.student.llm.model.layers[layer].self_attn.get_submodule(m)
            grad_w = want[f"llm.model.layers.{layer}.self_attn.{m}.weight"]
            assert grad_w.abs().sum() > 0
            torch.testing.assert_close(got[f"llm.model.layers.{layer}.self_attn.{m}.lora_B.default.weight"],
                                       mod.scaling["default"] * grad_w @ mod.lora_A["default"].weight.T)


def test_merged_weights_compute_what_the_adapted_model_computes():
    ts = tiny_pair()
    s = ts.student
    add_lora(s, rank=4)
    with torch.no_grad():
        for n, p in s.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    b = tiny_batch()
    want = s(b["input_ids"], b["attention_mask"], b["pixel_values"])["logits"]
    plain = tiny_vlm(layers=4, hidden=32, seed=2)
    plain.connector, plain.post_connector, plain.config = s.connector, torch.nn.Linear(48, 32), s.config
    plain.load_state_dict(plain_state_dict(s))
    got = plain(b["input_ids"], b["attention_mask"], b["pixel_values"])["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any(".lora_" in k or "base_layer" in k for k in plain_state_dict(s))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the frozen base LM is held in bf16
def test_lora_run_saves_plain_checkpoints_and_resumes_bit_exact(hf, dtype):
    root = hf["root"] / f"lora_{dtype}"
    common = dict(init_from=hf["dpt"], teacher=hf["teacher"], data=hf["data"], max_steps=4, lora_rank=4,
                  student_layers=[0, 1], teacher_layers=[1, 2, 3], dtype=dtype)
    run("dft", out_dir=str(root / "straight"), **common)
    run("dft", out_dir=str(root / "cut"), stop_after=2, **common)
    run("dft", out_dir=str(root / "cut"), **common)
    a, b = weights(root / "straight"), weights(root / "cut")
    assert a.keys() == weights(hf["dpt"]).keys()  # a plain model: the adapters are merged in
    assert {v.dtype for v in a.values()} == {torch.float32}
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = weights(hf["dpt"])
    if dtype == "bfloat16":  # the frozen base LM was held in bf16 (autocast computes with it there anyway)
        base = {k: v.bfloat16().float() if k.startswith("llm.") else v for k, v in base.items()}
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert "post_connector.weight" in changed and any(".q_proj.weight" in k for k in changed)
    assert not any(k.startswith(("vision_tower.", "connector.")) or "embed" in k or "lm_head" in k for k in changed)
    sa, sb = (torch.load(root / d / "train_state.pt", weights_only=False) for d in ("straight", "cut"))
    assert sa["trainable"].keys() == sb["trainable"].keys() and len(sa["trainable"]) == 2 * 2 * 7 + 2
    assert all(torch.equal(sa["trainable"][k], sb["trainable"][k]) for k in sa["trainable"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


def test_lora_resume_refuses_a_changed_base(hf, tmp_path):
    common = dict(init_from=hf["dpt"], data=hf["data"], max_steps=3, lora_rank=4, out_dir=str(tmp_path / "run"))
    run("sft", stop_after=1, **common)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    state["trainable"] = {k: v + 1 for k, v in state["trainable"].items()}  # as if the base had changed under it
    torch.save(state, tmp_path / "run" / "train_state.pt")
    with pytest.raises(ValueError, match="its base weights \\(init_from\\) changed since the run started"):
        run("sft", **common)


def test_lora_resumes_from_a_sharded_checkpoint(hf, tmp_path, monkeypatch):
    """A real student in float32 is saved in shards (past checkpoint.SHARD_BYTES): the resume check reads them all."""
    import json
    import checkpoint
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 50_000)  # the tiny student then takes several files
    common = dict(init_from=hf["dpt"], data=hf["data"], max_steps=3, lora_rank=4, out_dir=str(tmp_path / "run"))
    run("sft", stop_after=1, **common)
    index = json.load(open(tmp_path / "run" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "run" / "model.safetensors").exists()
    assert run("sft", **common)["step"] == 3


def test_lora_is_refused_where_the_lm_does_not_train(hf, tmp_path):
    with pytest.raises(ValueError, match="lora_rank=4: LoRA adapts the LM, which does not train in this stage"):
        run("dpt", init_from=hf["dpt"], teacher=hf["teacher"], data=hf["data"], out_dir=str(tmp_path / "x"),
            lora_rank=4, student_layers=[0, 1], teacher_layers=[1, 2, 3])


def test_without_peft_lora_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    with pytest.raises(ImportError, match="lora_rank=8 needs peft, an optional dependency: pip install peft"):
        add_lora(tiny_vlm(), rank=8)
