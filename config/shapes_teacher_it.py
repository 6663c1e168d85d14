# The shapes teacher, run 2 of 2: instruction tuning of config/shapes_teacher.py's model, as LLaVA's second stage
# (instructions only; the LM, the connector and the tower train on), still under privileged supervision, with one
# more head of the answer layers pulled to the question's relation word (privileged.py). Applied over run 1's preset:
#   python train_sft.py config/shapes_teacher.py config/shapes_teacher_it.py
# Run 1 alone knows colours, sizes, places and what exists; this run adds relations (yes/no 58 -> 100 on the test set,
# one seed: results/README.md, "A teacher told where to look").
init_from = "out/shapes/teacher_pt"
out_dir = "out/shapes/teacher"
data = "out/shapes/instruct.json"
max_steps = 500
lr = 5e-4
warmup_frac = 0.05
privileged = {"relation_head": 3}
