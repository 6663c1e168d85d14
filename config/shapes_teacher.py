# The shapes teacher, run 1 of 2 (run 2, instruction tuning: config/shapes_teacher_it.py):
#   python train_sft.py config/shapes_teacher.py && python train_sft.py config/shapes_teacher_it.py
# A 6-layer, 256-wide Qwen2 LM trained from scratch with its connector (LLaVA-style:
# captions and instructions mixed) on the world's pretrained vision tower (shapes_tower.py: a small
# SigLIP that names each cell's colour, shape, size and place), frozen and shared with the students, as a
# pretrained SigLIP is in the real recipe. 48 px images / 16 px patches: 9 visual tokens, one per grid cell.
# (The tower is pretrained on its own: learned through this LM, it gets too little signal at a CPU budget.)
init_from = "scratch"
out_dir = "out/shapes/teacher_pt"
data = "out/shapes/pretrain.json,out/shapes/instruct.json"
vision_model = "out/shapes/vision_tower"
llm = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
max_length = 128
batch_size = 32
max_steps = 1000
lr = 1e-3            # 2e-3 stalls an LM of this size
warmup_frac = 0.15
weight_decay = 0.01
beta2 = 0.98
eval_interval = 250
save_interval = 50         # Ctrl-C / SIGTERM save too: an interruption costs little
# Privileged supervision (privileged.py), for this teacher only: heads told where to look, and a training-only
# readout of where the looked-at objects are, from the world's scenes.json. Without it the teacher stays at chance
# on colour-after-look, position and existence questions; the students never get it.
look_weight = 1.0
readout_weight = 1.0
