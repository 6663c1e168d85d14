"""
Stage 2 of CompoDistill: DFT, distilled fine-tuning, on instruction data (LLaVA mix665K format).
Losses: L_LM + kd_weight * L_KD + vat_weight * L_VAT (visual attention alignment over the matched
intermediate layers, group matching by default). Trains the LLM and the post_connector.

    python train_dft.py config/shapes_dft.py                        # from out/shapes/dpt -> out/shapes/dft
    torchrun --nproc_per_node=8 train_dft.py config/qwen15_dft.py
"""
import trainer
from configurator import cli
from stages import stage_defaults

STAGE_DEFAULTS = stage_defaults("dft")  # its row of stages.STAGES, on out/shapes

if __name__ == "__main__":
    cli(lambda: trainer.main(STAGE_DEFAULTS, doc=__doc__))
