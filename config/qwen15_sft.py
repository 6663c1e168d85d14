# Real recipe, stage 3 (SFT): LM loss only, no teacher.
# torchrun --nproc_per_node=8 train_sft.py config/qwen15_sft.py
init_from = "out/qwen15/dft"
out_dir = "out/qwen15/sft"
data = "DATA/llava_v1_5_mix665k.json"
image_folder = "DATA"
max_length = 2048
batch_size = 4
grad_accum = 4
max_steps = 5200
lr = 2e-4
warmup_frac = 0.03
grad_ckpt = True
eval_interval = 1000
save_interval = 500
