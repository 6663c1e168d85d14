"""
Stage 2 of CompoDistill: DFT, distilled fine-tuning, on instruction data (LLaVA mix665K format). The student, from
DPT's checkpoint (TAF's connector came with it), learns the answers (L_LM), the frozen teacher's next-token
distributions (L_KD) and where the teacher's matched layers look in the image (L_VAT, visual attention alignment):

    total = L_LM + kd_weight * L_KD + vat_weight * L_VAT          (model.TeacherStudent.forward)

The LM and the post_connector train. Its defaults are the recipe on the embedded shapes world; config files and
--key=value change what differs (--help lists every setting):

    python train_dft.py                                              # out/shapes/dpt -> out/shapes/dft
    python train_dft.py config/shapes_dft.py config/shapes_hard_dft.py   # the hard world
    torchrun --nproc_per_node=8 train_dft.py config/qwen15_dft.py    # the paper's recipe
"""
import sys

from attention_distill import VATSettings
from configurator import cli
from model import TeacherStudent
from run import DEFAULTS as SHARED, Run, configure_stage
from run_models import load_student, load_teacher

# DFT's settings: its recipe on the shapes world, over the settings every stage shares (run.DEFAULTS: the models'
# start, data, how VAT is computed, LoRA, optimizer, DDP/FSDP, logging)
DEFAULTS = dict(
    SHARED,
    stage="dft",                      # this stage, recorded in its checkpoint
    init_from="out/shapes/dpt",       # where the student starts: DPT's checkpoint (any checkpoint directory, a
                                      # Hugging Face LLaVA one, "backbones" or "scratch": see train_sft.py)
    teacher="out/shapes/teacher",     # the frozen teacher's checkpoint (two runs of train_sft.py: README)
    out_dir="out/shapes/dft",         # the checkpoint directory DFT writes, where SFT starts
    data="out/shapes/instruct.json",  # LLaVA .json/.jsonl (several joined by commas are mixed): instructions
    kd_weight=1.0,                    # weight of L_KD, the logit distillation (0: none)
    vat_weight=1.0,                   # weight of L_VAT, the visual attention alignment (0: none)
    student_layers=[1, 2],            # the student layers VAT aligns (of 4: the middle ones; other forms: run.py)
    teacher_layers=[2, 3, 4],         # the teacher's (of 6): group matching gives windows [2, 3] and [3, 4]
    max_length=128,                   # tokens per sample; longer text is cut (and counted), a cut image drops it
    batch_size=32,                    # samples per micro-batch per process
    max_steps=200,                    # optimizer steps of this stage
    lr=1e-3,                          # peak learning rate (AdamW): a small LM from scratch takes a high one
    warmup_frac=0.1,                  # linear warm-up over this fraction of max_steps, then cosine
    weight_decay=0.01,                # AdamW's, on matrices only (not on biases and norms)
    beta2=0.98,                       # AdamW's beta2
    eval_interval=200,                # steps between validation losses (0: none, and no data held out): one
    save_interval=50,                 # steps between checkpoints (and one at the end, and on Ctrl-C / SIGTERM)
)


def models(cfg, resume_dir=None):
    """DFT's models, on the CPU: the frozen teacher, the student (DPT's checkpoint; out_dir's when resuming), and
    the module that joins them and computes the losses."""
    teacher = load_teacher(cfg)
    student = load_student(cfg, teacher, resume_dir)
    vat_settings = VATSettings.from_config(cfg)  # which layers are matched, whose rows, which pooling and distance
    ts = TeacherStudent(teacher, student, vat_settings, kd_weight=cfg["kd_weight"], vat_weight=cfg["vat_weight"],
                        kd_temperature=cfg["kd_temperature"])
    if cfg["taf"] and not student.config.taf:  # TAF normally comes with DPT's checkpoint
        ts.apply_taf()
    return ts


def train(cfg):
    """DFT with the resolved settings `cfg`; returns the last log record."""
    with_kd, with_vat = cfg["kd_weight"] > 0, cfg["vat_weight"] > 0  # a loss at weight 0 is not computed
    with Run(cfg, distills=True) as run:  # settings checked, out_dir locked, processes, device, the resume point
        model = run.build(lambda resume_dir: models(cfg, resume_dir), train_llm=True)  # the LM trains
        for batch in run.batches():  # this rank's micro-batches, on the device, under autocast
            losses = model(batch, with_kd=with_kd, with_vat=with_vat)  # {"lm", "kd", "vat", "total"}
            run.step(losses)  # backward; after a step's last micro-batch: clip, AdamW, LR, log, validate, save
    return run.result


def main(argv=None, defaults=DEFAULTS):
    return train(configure_stage(defaults, sys.argv[1:] if argv is None else argv, __doc__, __file__))


if __name__ == "__main__":
    cli(main)
