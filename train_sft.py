"""
Stage 3 of CompoDistill: SFT, supervised fine-tuning, on instruction data (LLaVA mix665K format), from DFT's
checkpoint. No teacher: the LM loss alone (model.TeacherStudent.forward with teacher=None):

    total = L_LM

The LM and the post_connector train. Its defaults are the recipe on the embedded shapes world; config files and
--key=value change what differs (--help lists every setting):

    python train_sft.py                                              # out/shapes/dft -> out/shapes/sft
    python train_sft.py config/shapes_sft.py config/shapes_hard_sft.py   # the hard world
    torchrun --nproc_per_node=8 train_sft.py config/qwen15_sft.py    # the paper's recipe

The same script trains a teacher (any LLaVA-style model): from "scratch" or "backbones", optionally with its tower
(train_vision) and, for the shapes teacher, with privileged supervision (privileged.py: heads told where to look and
a readout of where things are, from the world's scenes.json; look_weight, readout_weight, scenes, privileged), which
a student never gets:

    python train_sft.py config/shapes_teacher.py                     # -> out/shapes/teacher_pt
    python train_sft.py config/shapes_teacher.py config/shapes_teacher_it.py   # instruction tuning -> .../teacher
"""
import sys

from configurator import cli
from model import TeacherStudent
from run import DEFAULTS as SHARED, Run, configure_stage
from run_data import scenes_path
from run_models import load_student

# SFT's settings: its recipe on the shapes world, over the settings every stage shares (run.DEFAULTS: the models'
# start, data, LoRA, optimizer, DDP/FSDP, logging, and the teacher-training options)
DEFAULTS = dict(
    SHARED,
    stage="sft",                      # this stage, recorded in its checkpoint
    init_from="out/shapes/dft",       # where the student starts: a checkpoint directory (DFT's; or a Hugging Face
                                      # LLaVA one), "backbones" (vision_model + llm_model) or "scratch" (llm / vision)
    out_dir="out/shapes/sft",         # the checkpoint directory SFT writes: the finished student (evaluate.py)
    data="out/shapes/instruct.json",  # LLaVA .json/.jsonl (several joined by commas are mixed): instructions
    kd_weight=0.0,                    # no teacher: no L_KD
    vat_weight=0.0,                   # and no L_VAT
    max_length=128,                   # tokens per sample; longer text is cut (and counted), a cut image drops it
    batch_size=32,                    # samples per micro-batch per process
    max_steps=50,                     # optimizer steps of this stage
    lr=3e-4,                          # peak learning rate (AdamW): lower than DFT's, a short polish
    warmup_frac=0.1,                  # linear warm-up over this fraction of max_steps, then cosine
    weight_decay=0.01,                # AdamW's, on matrices only (not on biases and norms)
    beta2=0.98,                       # AdamW's beta2
    eval_interval=50,                 # steps between validation losses (0: none, and no data held out): one
    save_interval=50,                 # steps between checkpoints (and one at the end, and on Ctrl-C / SIGTERM)
)


def privileged_losses(cfg, student):
    """Training the shapes teacher: its privileged supervision (privileged.Privileged), or None when off."""
    if not (cfg["look_weight"] > 0 or cfg["readout_weight"] > 0):
        return None
    from privileged import Privileged, PrivilegedSettings, world_meta
    return Privileged(PrivilegedSettings.from_config(cfg["privileged"]), student.llm.config.hidden_size,
                      world_meta(scenes_path(cfg))["grid"], cfg["look_weight"], cfg["readout_weight"])


def models(cfg, resume_dir=None):
    """SFT's model, on the CPU: the student (DFT's checkpoint, a new model, or out_dir's when resuming) without a
    teacher; a teacher in training gets its privileged losses."""
    student = load_student(cfg, None, resume_dir)
    return TeacherStudent(None, student, kd_weight=cfg["kd_weight"], vat_weight=cfg["vat_weight"],
                          kd_temperature=cfg["kd_temperature"], privileged=privileged_losses(cfg, student))


def train(cfg):
    """SFT with the resolved settings `cfg`; returns the last log record."""
    with Run(cfg, distills=False) as run:  # settings checked, out_dir locked, processes, device, the resume point
        model = run.build(lambda resume_dir: models(cfg, resume_dir), train_llm=True)  # the LM trains
        for batch in run.batches():  # this rank's micro-batches, on the device, under autocast
            losses = model(batch, with_kd=False, with_vat=False)  # {"lm", "kd", "vat", "total"} (+ "look", "readout")
            run.step(losses)  # backward; after a step's last micro-batch: clip, AdamW, LR, log, validate, save
    return run.result


def main(argv=None, defaults=DEFAULTS):
    return train(configure_stage(defaults, sys.argv[1:] if argv is None else argv, __doc__, __file__))


if __name__ == "__main__":
    cli(main)
