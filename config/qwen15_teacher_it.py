# Real recipe, teacher (4B), run 2 of 2: instruction tuning of config/qwen15_teacher.py's connector-pretrained model
# (LLaVA-1.5's second stage: the LM and the connector train, lr 2e-5, effective batch 128).
# torchrun --nproc_per_node=8 train_sft.py config/qwen15_teacher_it.py
init_from = "out/qwen15/teacher_pt"
out_dir = "out/qwen15/teacher"
data = "DATA/llava_v1_5_mix665k.json"
image_folder = "DATA"
train_llm = True
max_length = 2048
batch_size = 4
grad_accum = 4             # x 8 GPUs = 128
max_steps = 5200           # one epoch of 665K
lr = 2e-5                  # full fine-tuning of the LM: LLaVA-1.5's rate
warmup_frac = 0.03
weight_decay = 0.0         # AdamW's (the shapes recipe's 0.01 is for its small LMs from scratch)
beta2 = 0.999              # AdamW's beta2
val_frac = 0.001           # 0.1 % held out for the validation loss (the start-up log counts them); the rest trains
num_workers = 4            # DataLoader processes per GPU: image decoding and resizing stay out of the training process
grad_ckpt = True
eval_interval = 1000
save_interval = 500
