# The hard world's student, stage 1 (DPT), over config/shapes_dpt.py:
#   python train_dpt.py config/shapes_dpt.py config/shapes_hard_dpt.py
# The hard world's students get 1.5x the default students' budget (DPT 225 / DFT 300 / SFT 75 steps of 32): measured
# on a pilot seed, a student without a teacher is at chance on CR at 1x (52.4 %), 76.8 % at 2x and 83.2 % at 4x (the
# teacher: 90.1 %), so 1.5x sits inside its learning transition, where a teacher can make a difference.
teacher = "out/shapes_hard/teacher"
out_dir = "out/shapes_hard/dpt"
data = "out/shapes_hard/pretrain.json"
max_steps = 225
eval_interval = 225
save_interval = 225
