# Shapes student, stage 1 (DPT). The student's LM is new (random), so unlike the paper's DPT, where only
# the post_connector trains, it also learns language here: train_llm = True.
init_from = "scratch"
teacher = "out/shapes/teacher"
out_dir = "out/shapes/dpt"
data = "out/shapes/pretrain.json"
llm = dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
train_llm = True
student_layers = [1, 2]      # of 4: the middle layers
teacher_layers = [2, 3, 4]   # of 6: group matching gives windows [2, 3] and [3, 4]
max_length = 128
batch_size = 32
max_steps = 150
lr = 1e-3
warmup_frac = 0.15
weight_decay = 0.01
beta2 = 0.98
eval_interval = 150
save_interval = 50         # Ctrl-C / SIGTERM save too: an interruption costs little
