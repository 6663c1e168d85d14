# The hard shapes world's student, stage 2 (DFT): as config/shapes_dft.py, on out/shapes_hard.
init_from = "out/shapes_hard/dpt"
teacher = "out/shapes_hard/teacher"
out_dir = "out/shapes_hard/dft"
data = "out/shapes_hard/instruct.json"
student_layers = [1, 2]
teacher_layers = [2, 3, 4]
max_length = 128
batch_size = 32
max_steps = 300
lr = 1e-3
warmup_frac = 0.1
weight_decay = 0.01
beta2 = 0.98
eval_interval = 300
save_interval = 300
