# Shapes student, stage 3 (SFT): train_sft.py's defaults are this recipe, so this file changes nothing. It is named
# for the worlds layered over it (config/shapes_hard_sft.py) and the commands that pass it (run_shapes.sh).
