"""
Stage 1 of CompoDistill: DPT, distilled pre-training, on image-caption data (LLaVA-Pretrain format).
Losses: L_LM + kd_weight * L_KD (logit KD from the teacher). TAF is on by default: the student takes
the teacher's trained connector (frozen) and trains only a new post_connector (d_teacher -> d_student).

    python train_dpt.py config/shapes_dpt.py                        # the embedded default -> out/shapes/dpt
    torchrun --nproc_per_node=8 train_dpt.py config/qwen15_dpt.py   # the paper's 2B-from-4B recipe
"""
import trainer
from configurator import cli
from stages import stage_defaults

STAGE_DEFAULTS = stage_defaults("dpt")  # its row of stages.STAGES, on out/shapes

if __name__ == "__main__":
    cli(lambda: trainer.main(STAGE_DEFAULTS, doc=__doc__))
