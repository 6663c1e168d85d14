"""
Stage 1 of CompoDistill: DPT, distilled pre-training, on image captions (LLaVA-Pretrain format). A new student
takes the teacher's trained connector, frozen, plus a new post_connector (TAF, teacher adapter fetch: the student
reads the visual tokens the teacher was trained on), and learns the captions (L_LM) and the frozen teacher's
next-token distributions (L_KD); no VAT yet:

    total = L_LM + kd_weight * L_KD                               (model.TeacherStudent.forward)

In the paper's DPT only the post_connector trains (train_llm=None: the stage decides, as config/qwen15_dpt.py
does). The shapes student's LM is new (random), so here it also learns language: train_llm=True. Its defaults are
the recipe on the embedded shapes world; config files and --key=value change what differs (--help lists them all):

    python train_dpt.py                                              # out/shapes/teacher -> out/shapes/dpt
    python train_dpt.py config/shapes_dpt.py config/shapes_hard_dpt.py   # the hard world
    torchrun --nproc_per_node=8 train_dpt.py config/qwen15_dpt.py    # the paper's recipe
"""
import sys

from attention_distill import VATSettings
from configurator import cli
from model import TeacherStudent
from run import DEFAULTS as SHARED, Run, configure_stage
from run_models import load_student, load_teacher

# DPT's settings: its recipe on the shapes world, over the settings every stage shares (run.DEFAULTS: the models'
# start, data, how VAT is computed, LoRA, optimizer, DDP/FSDP, logging)
DEFAULTS = dict(
    SHARED,
    stage="dpt",                      # this stage, recorded in its checkpoint
    init_from="scratch",              # where the student starts: "scratch", a new LM (llm) on the teacher's tower
                                      # and tokenizer (or "backbones", or a checkpoint directory: see train_sft.py)
    llm=dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),  # the new student's LM
    teacher="out/shapes/teacher",     # the frozen teacher's checkpoint (two runs of train_sft.py: README)
    out_dir="out/shapes/dpt",         # the checkpoint directory DPT writes, where DFT starts
    data="out/shapes/pretrain.json",  # LLaVA .json/.jsonl (several joined by commas are mixed): captions
    taf=True,                         # TAF: the teacher's connector (frozen) + a new post_connector
    train_llm=True,                   # the new LM learns language here (None: the stage decides, connector only)
    kd_weight=1.0,                    # weight of L_KD, the logit distillation (0: none)
    vat_weight=0.0,                   # weight of L_VAT (0: none in DPT)
    student_layers=[1, 2],            # the layer pairs the checkpoint records, which DFT aligns: of 4, the middle
    teacher_layers=[2, 3, 4],         # the teacher's (of 6): group matching gives windows [2, 3] and [3, 4]
    max_length=128,                   # tokens per sample; longer text is cut (and counted), a cut image drops it
    batch_size=32,                    # samples per micro-batch per process
    max_steps=150,                    # optimizer steps of this stage
    lr=1e-3,                          # peak learning rate (AdamW): a small LM from scratch takes a high one
    warmup_frac=0.15,                 # linear warm-up over this fraction of max_steps, then cosine
    weight_decay=0.01,                # AdamW's, on matrices only (not on biases and norms)
    beta2=0.98,                       # AdamW's beta2
    eval_interval=150,                # steps between validation losses (0: none, and no data held out): one
    save_interval=50,                 # steps between checkpoints (and one at the end, and on Ctrl-C / SIGTERM)
)


def models(cfg, resume_dir=None):
    """DPT's models, on the CPU: the frozen teacher, the new student (out_dir's checkpoint when resuming) and the
    module that joins them and computes the losses; TAF applied to a new student."""
    teacher = load_teacher(cfg)
    student = load_student(cfg, teacher, resume_dir)
    ts = TeacherStudent(teacher, student, VATSettings.from_config(cfg), kd_weight=cfg["kd_weight"],
                        vat_weight=cfg["vat_weight"], kd_temperature=cfg["kd_temperature"])
    if cfg["taf"] and not student.config.taf:  # a resumed student has it already
        ts.apply_taf()
    return ts


def train(cfg):
    """DPT with the resolved settings `cfg`; returns the last log record."""
    with_kd, with_vat = cfg["kd_weight"] > 0, cfg["vat_weight"] > 0  # a loss at weight 0 is not computed
    with Run(cfg, distills=True) as run:  # settings checked, out_dir locked, processes, device, the resume point
        # what trains: the post_connector; the LM only where the train_llm setting says so (the shapes recipe)
        model = run.build(lambda resume_dir: models(cfg, resume_dir), train_llm=False)
        for batch in run.batches():  # this rank's micro-batches, on the device, under autocast
            losses = model(batch, with_kd=with_kd, with_vat=with_vat)  # {"lm", "kd", "vat", "total"}
            run.step(losses)  # backward; after a step's last micro-batch: clip, AdamW, LR, log, validate, save
    return run.result


def main(argv=None, defaults=DEFAULTS):
    return train(configure_stage(defaults, sys.argv[1:] if argv is None else argv, __doc__, __file__))


if __name__ == "__main__":
    cli(main)
