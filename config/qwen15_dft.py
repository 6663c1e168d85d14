# Real recipe, stage 2 (DFT): LM + KD + VAT; student layers 8..14 <-> teacher windows over 13..23 (the presets).
# torchrun --nproc_per_node=8 train_dft.py config/qwen15_dft.py
init_from = "out/qwen15/dpt"
teacher = "out/qwen15/teacher"
out_dir = "out/qwen15/dft"
data = "DATA/llava_v1_5_mix665k.json"
image_folder = "DATA"
student_layers = None      # VAT's layers: the reference's preset for the model's depth (8..14 of 24)
teacher_layers = None      # and the teacher's (13..23 of 40)
max_length = 2048
batch_size = 4
grad_accum = 4             # x 8 GPUs = 128 (reference)
max_steps = 5200
lr = 2e-5                  # full fine-tuning of the LM: LLaVA-1.5's rate (with LoRA, below: the reference's 2e-4)
warmup_frac = 0.03
weight_decay = 0.0         # AdamW's (the shapes recipe's 0.01 is for its small LMs from scratch)
beta2 = 0.999              # AdamW's beta2
val_frac = 0.001           # 0.1 % held out for the validation loss (the start-up log counts them); the rest trains
num_workers = 4            # DataLoader processes per GPU: image decoding and resizing stay out of the training process
grad_ckpt = True
eval_interval = 1000
save_interval = 500
# LoRA as in the reference recipe (needs `pip install peft`): adapters of rank 128, alpha 256 on every Linear of the
# LM's decoder layers at the reference's rate, 2e-4; only they and the post_connector train, and each checkpoint
# holds the merged model.
# lora_rank = 128
# lora_alpha = 256.0
# lora_dropout = 0.05
# lr = 2e-4
# Past one GPU's memory (docs/memory.md): shard the student, its optimizer and the teacher over the GPUs.
# fsdp = True
