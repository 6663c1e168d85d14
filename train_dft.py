"""
Stage 2 of CompoDistill: DFT, distilled fine-tuning, on instruction data (LLaVA mix665K format).
Losses: L_LM + kd_weight * L_KD + vat_weight * L_VAT (visual attention alignment over the matched
intermediate layers, group matching by default). Trains the LLM and the post_connector.

    python train_dft.py config/shapes_dft.py                        # from out/shapes/dpt -> out/shapes/dft
    torchrun --nproc_per_node=8 train_dft.py config/qwen15_dft.py
"""
import trainer
from configurator import cli

STAGE_DEFAULTS = dict(stage="dft", out_dir="out/shapes/dft", init_from="out/shapes/dpt",
                      data="out/shapes/instruct.json", teacher="out/shapes/teacher", kd_weight=1.0, vat_weight=1.0)

if __name__ == "__main__":
    cli(lambda: trainer.main(STAGE_DEFAULTS, doc=__doc__))
