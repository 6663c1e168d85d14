# The hard world's student, stage 2 (DFT), over config/shapes_dft.py:
#   python train_dft.py config/shapes_dft.py config/shapes_hard_dft.py
init_from = "out/shapes_hard/dpt"
teacher = "out/shapes_hard/teacher"
out_dir = "out/shapes_hard/dft"
data = "out/shapes_hard/instruct.json"
max_steps = 300
eval_interval = 300
save_interval = 300
