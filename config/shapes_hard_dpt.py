# The hard shapes world's student, stage 1 (DPT): as config/shapes_dpt.py, on out/shapes_hard (36 visual tokens).
# The hard world's students get 1.5x the default students' budget (DPT 225 / DFT 300 / SFT 75 steps of 32): measured
# on a pilot seed, a student without a teacher is at chance on CR at 1x (52.4 %), 76.8 % at 2x and 83.2 % at 4x (the
# teacher: 90.1 %), so 1.5x sits inside its learning transition, where a teacher can make a difference.
init_from = "scratch"
teacher = "out/shapes_hard/teacher"
out_dir = "out/shapes_hard/dpt"
data = "out/shapes_hard/pretrain.json"
llm = dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
train_llm = True
student_layers = [1, 2]      # of 4: the middle layers
teacher_layers = [2, 3, 4]   # of 6: group matching gives windows [2, 3] and [3, 4]
max_length = 128
batch_size = 32
max_steps = 225
lr = 1e-3
warmup_frac = 0.15
weight_decay = 0.01
beta2 = 0.98
eval_interval = 225
save_interval = 225
