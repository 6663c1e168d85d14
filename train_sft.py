"""
Stage 3 of CompoDistill: SFT, supervised fine-tuning on instruction data, L_LM only; the teacher is
not loaded. The same script trains the shapes teacher from scratch (config/shapes_teacher.py) and
the "student without distillation" baseline.

    python train_sft.py config/shapes_sft.py                        # from out/shapes/dft -> out/shapes/sft
    torchrun --nproc_per_node=8 train_sft.py config/qwen15_sft.py
"""
import trainer
from configurator import cli
from stages import stage_defaults

STAGE_DEFAULTS = stage_defaults("sft")  # its row of stages.STAGES, on out/shapes

if __name__ == "__main__":
    cli(lambda: trainer.main(STAGE_DEFAULTS, doc=__doc__))
