# Real recipe, stage 1 (DPT): Qwen1.5-1.8B student from a Qwen1.5-4B teacher, same SigLIP tower and tokenizer.
# torchrun --nproc_per_node=8 train_dpt.py config/qwen15_dpt.py
init_from = "backbones"
vision_model = "google/siglip-so400m-patch14-384"
llm_model = "Qwen/Qwen1.5-1.8B"
teacher = "out/qwen15/teacher"
out_dir = "out/qwen15/dpt"
data = "DATA/blip_laion_cc_sbu_558k.json"
image_folder = "DATA/images"
taf = True                 # trainable: post_connector only
train_llm = None           # the stage decides: DPT trains the post_connector alone, the LM stays frozen
llm = {}                   # (backbones: the LM is llm_model)
student_layers = None      # VAT's layers: the reference's preset for the model's depth (8..14 of 24)
teacher_layers = None      # and the teacher's (13..23 of 40)
max_length = 2048
batch_size = 8
grad_accum = 4             # x 8 GPUs = 256 (reference)
max_steps = 2180
lr = 2e-4                  # the reference's rate; DPT trains the post_connector only
warmup_frac = 0.03
weight_decay = 0.0         # AdamW's (the shapes recipe's 0.01 is for its small LMs from scratch)
beta2 = 0.999              # AdamW's beta2
val_frac = 0.001           # 0.1 % held out for the validation loss (the start-up log counts them); the rest trains
num_workers = 4            # DataLoader processes per GPU: image decoding and resizing stay out of the training process
grad_ckpt = True
eval_interval = 500
save_interval = 500
