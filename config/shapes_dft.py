# Shapes student, stage 2 (DFT): train_dft.py's defaults are this recipe, so this file changes nothing. It is named
# for the worlds layered over it (config/shapes_hard_dft.py) and the commands that pass it (run_shapes.sh).
