# The hard shapes world's student, stage 3 (SFT): as config/shapes_sft.py, on out/shapes_hard.
init_from = "out/shapes_hard/dft"
out_dir = "out/shapes_hard/sft"
data = "out/shapes_hard/instruct.json"
max_length = 128
batch_size = 32
max_steps = 75
lr = 3e-4
warmup_frac = 0.1
weight_decay = 0.01
beta2 = 0.98
eval_interval = 75
save_interval = 75
