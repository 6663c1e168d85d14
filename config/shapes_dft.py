# Shapes student, stage 2 (DFT): LM + KD + VAT on the instructions, from the DPT checkpoint.
init_from = "out/shapes/dpt"
teacher = "out/shapes/teacher"
out_dir = "out/shapes/dft"
data = "out/shapes/instruct.json"
student_layers = [1, 2]
teacher_layers = [2, 3, 4]
max_length = 128
batch_size = 32
max_steps = 200
lr = 1e-3
warmup_frac = 0.1
weight_decay = 0.01
beta2 = 0.98
eval_interval = 200
save_interval = 50         # Ctrl-C / SIGTERM save too: an interruption costs little
