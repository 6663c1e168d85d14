"""
CompoDistill's three stages in one table, STAGES: what each reads, which losses it turns on, what trains and whether
it loads the teacher. The stage scripts take their defaults from it (stage_defaults), set_trainable applies its
trainable sets, and trainer.py asks it whether to load the teacher.

The connector that trains (VLM.trainable_connector) is the post_connector under TAF (the connector itself is then the
teacher's, frozen), else the student's own connector. TAF is applied where a new student starts, in DPT; later stages
inherit it with the checkpoint. The LM trains whole, or through LoRA adapters (add_lora), as the reference recipe
does in DFT and SFT.
"""

# data: what the stage reads (the shapes world's captions, LLaVA-Pretrain format, or instructions, mix665K format);
# after: the stage whose checkpoint it starts from; losses: on (weight 1) besides L_LM; train_llm: whether the LM
# trains (the connector always does); teacher: whether it loads one; taf: a new student takes the teacher's connector.
STAGES = {
    "dpt": dict(data="pretrain.json", after="",    losses=("kd",),       train_llm=False, teacher=True,  taf=True),
    "dft": dict(data="instruct.json", after="dpt", losses=("kd", "vat"), train_llm=True,  teacher=True,  taf=False),
    "sft": dict(data="instruct.json", after="dft", losses=(),            train_llm=True,  teacher=False, taf=False),
}


def stage(name):
    """STAGES[name], or an error that lists the stages."""
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}': use {', '.join(STAGES)}")
    return STAGES[name]


def stage_defaults(name, root="out/shapes"):
    """A stage script's defaults: its row of STAGES, with the embedded world's paths under `root` (the teacher in
    <root>/teacher, each stage's checkpoint in <root>/<stage>, the previous stage's as init_from)."""
    s = stage(name)
    d = dict(stage=name, out_dir=f"{root}/{name}", data=f"{root}/{s['data']}",
             kd_weight=float("kd" in s["losses"]), vat_weight=float("vat" in s["losses"]))
    if s["after"]:
        d["init_from"] = f"{root}/{s['after']}"
    if s["teacher"]:
        d["teacher"] = f"{root}/teacher"
    if s["taf"]:
        d["taf"] = True
    return d


def trains_llm(name, train_llm=None):
    """Whether the LM trains: as `train_llm` says, else as the stage says."""
    if train_llm not in (None, True, False):
        raise ValueError(f"train_llm={train_llm!r}: use None (the stage decides), True or False")
    return stage(name)["train_llm"] if train_llm is None else train_llm


def set_trainable(student, name, train_llm=None, train_vision=False):
    """
    Freeze everything, then unfreeze the stage's trainable set: the trainable connector always; the LM where the stage
    (or `train_llm`) says, or only its LoRA adapters when it has them. A TAF connector never trains; the vision tower
    only with train_vision (a model trained from scratch, e.g. the shapes teacher; never when distilling). Returns
    the trainable parameters.
    """
    llm = trains_llm(name, train_llm)
    student.requires_grad_(False)
    student.trainable_connector.requires_grad_(True)
    if llm:
        lora = [p for n, p in student.llm.named_parameters() if is_lora(n)]
        for p in lora or student.llm.parameters():
            p.requires_grad_(True)
    if train_vision:
        student.vision_tower.requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]


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
