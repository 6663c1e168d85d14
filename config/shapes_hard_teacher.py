# The hard shapes world's teacher (python shapes.py --world=hard): the same 6-layer, 256-wide Qwen2 LM as
# config/shapes_teacher.py, trained from scratch with its connector on captions and instructions mixed, on the
# hard world's frozen tower. That tower was pretrained on local evidence only (what covers each 2x2 px block of a
# patch), so this LM has to learn shapes from silhouettes spread over several of its 36 visual tokens
# (48 px / 8 px patches), hence more steps than the default world's teacher.
init_from = "scratch"
out_dir = "out/shapes_hard/teacher"
data = "out/shapes_hard/pretrain.json,out/shapes_hard/instruct.json"
vision_model = "out/shapes_hard/vision_tower"
llm = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
max_length = 128
batch_size = 32
max_steps = 1000
lr = 1e-3
warmup_frac = 0.15
weight_decay = 0.01
beta2 = 0.98
eval_interval = 500
save_interval = 500
