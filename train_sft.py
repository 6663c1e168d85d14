"""
Stage 3 of CompoDistill: SFT, supervised fine-tuning on instruction data, L_LM only; the teacher is
not loaded. The same script trains the shapes teacher from scratch (config/shapes_teacher.py) and
the "student without distillation" baseline.

    python train_sft.py config/shapes_sft.py --init_from=out/dft
"""
import trainer

STAGE_DEFAULTS = dict(stage="sft", out_dir="out/sft", init_from="out/dft", data="out/shapes/instruct.json",
                      kd_weight=0.0, vat_weight=0.0)

if __name__ == "__main__":
    trainer.main(STAGE_DEFAULTS)
