# Shapes student, stage 1 (DPT): train_dpt.py's defaults are this recipe, so this file changes nothing. It is named
# for the worlds layered over it (config/shapes_hard_dpt.py) and the commands that pass it (run_shapes.sh).
