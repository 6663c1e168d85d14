"""
The models of a training run: the teacher and the student a stage script's make() loads (load_teacher,
load_student), then what every stage does to them before training (ready): LoRA's adapters, the trainable set, the
frozen parts in the compute dtype; and what is switched on before they are wrapped (prepare): gradient
checkpointing, torch.compile.
"""

import torch

from checkpoint import find_checkpoint, plain_state_dict, read_weights
from common import cast_weights
from model import VLM, load_vlm


def load_teacher(cfg):
    """The frozen teacher, when a loss or TAF needs one (kd_weight, vat_weight, taf), else None."""
    if not (cfg["kd_weight"] > 0 or cfg["vat_weight"] > 0 or cfg["taf"]):
        return None
    ckpt = find_checkpoint(cfg["teacher"]) if cfg["teacher"] else None
    if ckpt is None:
        raise FileNotFoundError(f"teacher={cfg['teacher']!r}: no teacher checkpoint; kd_weight/vat_weight/taf "
                                "need one (the shapes teacher: train_sft.py config/shapes_teacher.py, then the "
                                "same with config/shapes_teacher_it.py added)")
    return VLM.from_pretrained(ckpt)


def load_student(cfg, teacher, resume_dir):
    """The student: resumed from out_dir (resume_dir), or started the way init_from says (model.load_vlm). Whatever
    dtype the checkpoint was saved in (transformers 5 follows a bf16 Qwen config), AdamW updates float32 master
    weights: in bf16, updates smaller than 1/256 of a weight round away. bf16 lives in autocast."""
    student = VLM.from_pretrained(resume_dir) if resume_dir else load_vlm(cfg, teacher)
    return student.float()


def ready(make, cfg, resume_dir, state, amp, stage_train_llm):
    """The stage's models (make) as training starts them, on the CPU: LoRA's adapters (restored at resume), the
    trainable set (the LM trains as the stage says, `stage_train_llm`, unless the train_llm setting says otherwise),
    LoRA's frozen base and the frozen teacher in the compute dtype."""
    lora = cfg["lora_rank"] > 0
    ts = make(None if lora else resume_dir)  # LoRA resumes from its base plus the adapters (restore_lora)
    train_llm = decide_train_llm(stage_train_llm, cfg["train_llm"])
    if cfg["train_vision"] and ts.teacher is not None:
        raise ValueError("train_vision=True with a teacher: KD/VAT/TAF rely on the student sharing the teacher's "
                         "frozen vision tower")
    if lora:
        if not train_llm:
            raise ValueError(f"lora_rank={cfg['lora_rank']}: LoRA adapts the LM, which does not train in this stage "
                             "(DPT trains the connector only); set lora_rank=0, or train_llm=1")
        add_lora(ts.student, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
    set_trainable(ts.student, train_llm, cfg["train_vision"])
    if lora and amp is not None and not cfg["fsdp"]:
        # LoRA's frozen base LM is held in the compute dtype, as the teacher is: autocast would cast it there at every
        # use anyway, and it is most of the memory. (The tower stays float32: teacher and student must keep equal
        # towers across stages for TAF. FSDP's mixed precision casts for compute itself.)
        for n, p in ts.student.llm.named_parameters():
            if not p.requires_grad:
                p.data = p.data.to(amp)
    if lora and state:
        restore_lora(ts.student, state, resume_dir)
    if ts.teacher is not None and amp is not None:
        cast_weights(ts.teacher, amp)  # frozen: half the memory, and it runs under autocast anyway
    return ts


def decide_train_llm(stage_says, setting=None):
    """train_llm, whether the LM trains: as the train_llm setting says, else as the stage says."""
    if setting not in (None, True, False):
        raise ValueError(f"train_llm={setting!r}: use None (the stage decides), True or False")
    return stage_says if setting is None else setting


def set_trainable(student, train_llm, train_vision=False):
    """
    Freeze everything, then unfreeze what trains: the trainable connector always (VLM.trainable_connector: the
    post_connector under TAF, whose connector is the teacher's, frozen; else the student's own connector); the LM
    where `train_llm` says, or only its LoRA adapters when it has them; the vision tower only with train_vision (a
    model trained from scratch, e.g. the shapes teacher; never when distilling). Returns the trainable parameters.
    """
    student.requires_grad_(False)
    student.trainable_connector.requires_grad_(True)
    if train_llm:
        lora = [p for n, p in student.llm.named_parameters() if is_lora(n)]
        for p in lora or student.llm.parameters():
            p.requires_grad_(True)
    if train_vision:
        student.vision_tower.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]
def restore_lora(student, state, resume_dir):
    """A LoRA run resumes from its base (init_from, rebuilt) plus the adapters and other trainable weights kept in
    train_state.pt: the checkpoint's merged weights cannot be split back into base and adapters bit for bit. The
    base must still be what it was: the merge must give the checkpoint's weights exactly."""
    missing = [n for n, p in student.named_parameters() if p.requires_grad and n not in state["trainable"]]
    if missing:
        raise ValueError(f"{resume_dir}: train_state.pt lacks the trainable weights {missing[:3]}...; "
                         "it was not written by a LoRA run with these settings")
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n in state["trainable"]:
                p.copy_(state["trainable"][n])
    saved = read_weights(resume_dir)  # one file or shards, as save_pretrained wrote it
    merged = plain_state_dict(student)
    # (a tolerance: the save merged the same numbers, on the CPU, but a different BLAS may round the last bits)
    if any(not torch.allclose(merged[k].float(), v, rtol=1e-5, atol=1e-6) for k, v in saved.items()):
        raise ValueError(f"cannot resume the LoRA run in {resume_dir}: its base weights (init_from) changed since the "
                         "run started, so base + adapters no longer give the checkpoint. Start a new out_dir")


def prepare(ts, cfg):
    """What the student needs switched on before it is wrapped: with a frozen embedding (LoRA, or a frozen LM under
    FSDP) a text-only micro-batch gives nothing before layer 0 a gradient: that rank's backward would skip the
    decoder layers' re-gathers (a frozen LM) or reduce layer 0's adapters out of order (LoRA), out of step with a
    rank that has an image. A gradient on the embedding output takes every rank's backward through every layer in
    the same order. Then gradient checkpointing and torch.compile, when asked for."""
    if cfg["lora_rank"] > 0 or cfg["fsdp"]:
        ts.student.llm.enable_input_require_grads()
    if cfg["grad_ckpt"]:
        enable_checkpointing(ts.student.llm)
    if cfg["compile"]:
        compile_models(ts)
    return ts


def enable_checkpointing(llm):
    """Gradient checkpointing per decoder layer, non-reentrant: a reentrant first pass runs without a graph, and
    the VAT maps computed from it would have no gradient."""
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        llm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_models(ts, **kwargs):
    """torch.compile what training runs: the LMs' decoders (llm.base_model, called directly so that logits are
    computed only where the losses need them), in place, so state_dict keys and checkpoints do not change."""
    for m in (ts.student, ts.teacher):
        if m is not None:
            m.llm.base_model.compile(**kwargs)


def add_lora(student, rank, alpha=0.0, dropout=0.0, targets="all-linear"):
    """Rank-`rank` LoRA adapters (peft, an optional dependency) on the student LM's linears: by default every Linear
    of the decoder layers (not the LM head). B starts at zero, so the model's outputs do not change. alpha 0: 2 * rank
    (the reference's r 128 / alpha 256). The attention modules stay where they were, so VAT capture works unchanged.
    checkpoint.plain_state_dict merges the adapters back into plain weights."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError(f"lora_rank={rank} needs peft, an optional dependency: pip install peft") from e
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=targets)
    inject_adapter_in_model(cfg, student.llm)
    return student


def is_lora(name):
    return ".lora_" in name
