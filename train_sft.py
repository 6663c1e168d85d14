"""
Stage 3 of CompoDistill: SFT, supervised fine-tuning on instruction data, L_LM only; the teacher is
not loaded. The same script trains the shapes teacher from scratch (config/shapes_teacher.py) and
the "student without distillation" baseline.

    python train_sft.py config/shapes_sft.py                        # from out/shapes/dft -> out/shapes/sft
    torchrun --nproc_per_node=8 train_sft.py config/qwen15_sft.py
"""
import trainer
from configurator import cli

STAGE_DEFAULTS = dict(stage="sft", out_dir="out/shapes/sft", init_from="out/shapes/dft",
                      data="out/shapes/instruct.json", kd_weight=0.0, vat_weight=0.0)

if __name__ == "__main__":
    cli(lambda: trainer.main(STAGE_DEFAULTS, doc=__doc__))
