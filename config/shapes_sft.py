# Shapes student, stage 3 (SFT): LM loss only, from the DFT checkpoint; no teacher.
init_from = "out/shapes/dft"
out_dir = "out/shapes/sft"
data = "out/shapes/instruct.json"
max_length = 128
batch_size = 32
max_steps = 50
lr = 3e-4
warmup_frac = 0.1
weight_decay = 0.01
beta2 = 0.98
eval_interval = 50
save_interval = 50
