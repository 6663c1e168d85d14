# The hard world's student, stage 3 (SFT), over config/shapes_sft.py:
#   python train_sft.py config/shapes_sft.py config/shapes_hard_sft.py
init_from = "out/shapes_hard/dft"
out_dir = "out/shapes_hard/sft"
data = "out/shapes_hard/instruct.json"
max_steps = 75
eval_interval = 75
save_interval = 75
