# The shapes teacher: a 6-layer, 256-wide Qwen2 LM trained from scratch with its connector (LLaVA-style:
# captions and instructions mixed) and its small SigLIP tower. A frozen *random* tower carried too little
# image signal (features ~90 % constant over images; the teacher answered colour questions at chance), so
# the teacher learns its tower; the students then share it, frozen, like a pretrained SigLIP.
# 48 px images / 16 px patches: 9 visual tokens, one per cell of the 3x3 scene grid (SHAPES_NOTES.md).
init_from = "scratch"
out_dir = "out/shapes/teacher"
data = "out/shapes/pretrain.json,out/shapes/instruct.json"
vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, image_size=48, patch_size=16)
llm = dict(model_type="qwen2", hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
           num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
train_vision = True
max_length = 128
batch_size = 32
max_steps = 800
lr = 1e-3            # 2e-3 stalled this size in the prototype
warmup_frac = 0.15
weight_decay = 0.01
beta2 = 0.98
eval_interval = 200
save_interval = 400
