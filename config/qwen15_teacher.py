# Real recipe, teacher (4B): SigLIP-so400m + Qwen1.5-4B, LLaVA-style. Two runs of train_sft.py:
#   1) connector pre-training:  torchrun --nproc_per_node=8 train_sft.py config/qwen15_teacher.py
#   2) instruction tuning:      torchrun --nproc_per_node=8 train_sft.py config/qwen15_teacher_it.py
init_from = "backbones"
vision_model = "google/siglip-so400m-patch14-384"
llm_model = "Qwen/Qwen1.5-4B"
out_dir = "out/qwen15/teacher_pt"
data = "DATA/blip_laion_cc_sbu_558k.json"
image_folder = "DATA/images"
train_llm = False          # pre-training: the connector only
max_length = 2048
batch_size = 8
grad_accum = 4             # x 8 GPUs = 256
max_steps = 2180           # one epoch of 558K
lr = 1e-3                  # connector pre-training: LLaVA-1.5's rate
warmup_frac = 0.03
weight_decay = 0.0         # AdamW's (the shapes recipe's 0.01 is for its small LMs from scratch)
beta2 = 0.999              # AdamW's beta2
val_frac = 0.001           # 0.1 % held out for the validation loss (the start-up log counts them); the rest trains
num_workers = 4            # DataLoader processes per GPU: image decoding and resizing stay out of the training process
grad_ckpt = True
eval_interval = 500
save_interval = 500
