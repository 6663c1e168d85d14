"""
Stage 2 of CompoDistill: DFT, distilled fine-tuning, on instruction data (LLaVA mix665K format).
Losses: L_LM + kd_weight * L_KD + vat_weight * L_VAT (visual attention alignment over the matched
intermediate layers, group matching by default). Trains the LLM and the post_connector.

    python train_dft.py config/shapes_dft.py --init_from=out/dpt
"""
import trainer

STAGE_DEFAULTS = dict(stage="dft", out_dir="out/dft", init_from="out/dpt", data="out/shapes/instruct.json",
                      teacher="out/teacher", kd_weight=1.0, vat_weight=1.0)

if __name__ == "__main__":
    trainer.main(STAGE_DEFAULTS)
