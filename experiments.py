"""
Every row of the CompoDistill comparison on the shapes world (teacher; student alone; KD; +TAF; +VAT; CompoDistill;
matching, layer, VAT-loss, VAT-weight and VAT-stage ablations): DPT -> DFT -> SFT per row and seed, evaluate.py on
each SFT checkpoint, then <results>/shapes_table.md, shapes_results.json and shapes_chart.png (<results>: --results,
else results/ for the sizes whose tables are published there, quick and hard, else <out>/<size>/results).

    python experiments.py --size=quick             # CPU: the steps of config/shapes_*.py, as run_shapes.sh uses them
    python experiments.py --size=full --jobs=6     # one GPU (not yet run): longer teacher, batch 128, 6 pipelines
                                                   # at once
    python experiments.py --size=test --seeds=1    # tiny world and models, 1-2 steps (tests/test_experiments.py)
    python experiments.py --size=hard --ablation_seeds=3   # the hard world (shapes.WORLDS["hard"]): module ablation
                                                   # and VAT forms -> <results>/shapes_hard_table.md, ...json, ...png

Runs go under <out>/<size>/: shapes/, teacher/, seed<s>/dpt_<variant>/, seed<s>/<row>/{dft,sft,eval}/. A finished
stage writes <dir>.done.json (its arguments and wall time) and is skipped next time, so an interrupted call is just
rerun. --jobs=1: every stage in this process; --jobs=N: N pipelines at once, each stage a subprocess (log in
<dir>.log). Student seeds seed_offset..seed_offset+n-1 are passed as --seed to every stage; the teacher (seed 0) is
trained once.
"""
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image, ImageDraw

import shapes
import shapes_tower
from alignment import load_font
from configurator import cli, configure
from report import counts

ROOT = os.path.dirname(os.path.abspath(__file__))

# DPT variants (overrides on config/shapes_dpt.py): rows naming the same variant share one DPT run per seed.
DPT = {"kd_taf": {}, "kd": dict(taf=False), "none": dict(kd_weight=0, vat_weight=0, taf=False),
       "kd_taf_vat": dict(vat_weight=1.0), "kd_vat": dict(taf=False, vat_weight=1.0)}  # last two: VAT in DPT too

# (row, kind, DPT variant, DFT overrides on config/shapes_dft.py); SFT is config/shapes_sft.py for every row. A row
# whose resolved DFT config equals an earlier row's reuses its runs: group, intermediate, cosine and the paper's
# form are the recipe ("compodistill"). Layer sets on the 4-layer student / 6-layer teacher are explicit: the named
# DEPTH_RANGES give student early [0,1] (overlapping the recipe's layer 1) and intermediate [2] / teacher [2,3], not
# the recipe's [1,2] / [2,3,4]. Group windows: early [0]<-[0,1]; late [3]<-[4,5]; all: each <- 3 consecutive.
ROWS = [
    ("sft_only", "main", "none", dict(kd_weight=0, vat_weight=0, taf=False)),  # = run_shapes.sh's baseline
    ("kd", "main", "kd", dict(vat_weight=0, taf=False)),
    ("kd_taf", "main", "kd_taf", dict(vat_weight=0)),
    ("kd_vat", "main", "kd", dict(taf=False)),
    ("compodistill", "main", "kd_taf", {}),
    ("match_simple", "matching", "kd_taf", dict(matching="simple")),
    ("match_adaptive", "matching", "kd_taf", dict(matching="adaptive")),
    ("match_group", "matching", "kd_taf", dict(matching="group")),
    ("layers_early", "layers", "kd_taf", dict(student_layers=[0], teacher_layers=[0, 1])),
    ("layers_intermediate", "layers", "kd_taf", dict(student_layers=[1, 2], teacher_layers=[2, 3, 4])),
    ("layers_late", "layers", "kd_taf", dict(student_layers=[3], teacher_layers=[4, 5])),
    ("layers_all", "layers", "kd_taf", dict(student_layers=[0, 1, 2, 3], teacher_layers=[0, 1, 2, 3, 4, 5])),
    ("vat_cosine", "vat_loss", "kd_taf", dict(vat_loss="cosine")),
    ("vat_mse", "vat_loss", "kd_taf", dict(vat_loss="mse")),
    ("vat_kl", "vat_loss", "kd_taf", dict(vat_loss="kl")),
    ("vat_paper_form", "vat_form", "kd_taf", dict(vat_queries="all", vat_pool="flat")),
    ("vat_reference_form", "vat_form", "kd_taf", dict(vat_queries="image", vat_pool="column")),
    # Not in the paper's tables: the VAT term is small next to LM + KD on this world (cosine distance ~0.02-0.04 at
    # the end of DFT), so does a 10x weight change what VAT adds?
    ("kd_vat_w10", "vat_weight", "kd", dict(taf=False, vat_weight=10.0)),
    ("compodistill_w10", "vat_weight", "kd_taf", dict(vat_weight=10.0)),
    # Also not in the paper: VAT in DPT as well as DFT. CR scores captions, which the students learn in DPT, where
    # the method has no VAT; do the captions change when the attention is aligned there too?
    ("kd_vat_dpt", "vat_stage", "kd_vat", dict(taf=False)),
    ("compodistill_vat_dpt", "vat_stage", "kd_taf_vat", {}),
]

# The hard world (shapes.WORLDS["hard"], presets config/shapes_hard_*.py, whose DFT preset fixes the VAT weight for
# every row): the module ablation, and VAT's three forms (the paper's Eq. 2, the default: all queries, flattened; text
# queries only, flattened; the reference code's: image queries, column-pooled). The "pilot" rows run only when named
# in --rows: they chose the VAT weight on a seed that is not one of the table's (--seed_offset).
HARD_ROWS = ROWS[:5] + [  # the main rows, as on the default world
    ("kd_vat_text_form", "vat_form", "kd", dict(taf=False, vat_queries="text", vat_pool="flat")),
    ("kd_vat_reference_form", "vat_form", "kd", dict(taf=False, vat_queries="image", vat_pool="column")),
    ("compodistill_reference_form", "vat_form", "kd_taf", dict(vat_queries="image", vat_pool="column")),
] + [(f"kd_vat_w{w:g}", "pilot", "kd", dict(taf=False, vat_weight=float(w))) for w in (1, 3, 10, 30)]

TINY_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=24, patch_size=8)  # 9 visual tokens, like the real size
TINY_HARD = dict(TINY_VISION, image_size=32)  # 16 visual tokens on the hard world's 4x4 grid
TINY_LLM = dict(model_type="qwen2", intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, tie_word_embeddings=True)
# Per size: the world, the eval limit, the default --jobs, overrides for every stage ("all") and per stage; the hard
# sizes also name their presets (config/<presets>_<stage>.py, layered over config/shapes_<stage>.py; also the results
# files' prefix) and rows. "published": the size whose tables are the committed ones in results/ (the others write
# theirs under <out>/<size>/results).
SIZES = {
    "test": dict(world=dict(n_train=24, n_test=4, image_size=24), eval_limit=2, jobs=1,
                 tower=dict(vision=TINY_VISION, steps=2, batch_size=4, progress=False),
                 all=dict(batch_size=2, max_length=64, max_steps=1, warmup_frac=0.0, log_interval=1, eval_interval=0),
                 teacher=dict(llm=dict(TINY_LLM, hidden_size=48, num_hidden_layers=6), max_steps=2),
                 dpt=dict(llm=dict(TINY_LLM, hidden_size=32, num_hidden_layers=4)), dft=dict(max_steps=2), sft={}),
    "quick": dict(world=dict(n_train=4000, n_test=200, image_size=48), eval_limit=0, jobs=2, tower={},
                  all={}, teacher={}, dpt={}, dft={}, sft={}, published=True),
    # Not yet run on a GPU. The students keep the quick size's sample budget (below their own learning transition)
    # at batch 128; the teacher gets 8x the quick teacher's samples, a bigger world and 4x the eval items.
    "full": dict(world=dict(n_train=8000, n_test=800, image_size=48), eval_limit=0, jobs=6, tower={},
                 all=dict(batch_size=128, num_workers=2, log_interval=10),
                 teacher=dict(max_steps=2000, eval_interval=500, save_interval=1000),
                 teacher_it=dict(max_steps=500, eval_interval=250, save_interval=250),
                 dpt=dict(max_steps=40, eval_interval=40, save_interval=40),
                 dft=dict(max_steps=50, eval_interval=50, save_interval=50),
                 sft=dict(max_steps=13, eval_interval=13, save_interval=13)),
    # The hard world at the quick size's budgets and batch (its own presets); CPU, 2 pipelines at once.
    "hard": dict(world=dict(shapes.WORLDS["hard"], n_train=4000, n_test=200), eval_limit=0, jobs=2, tower={},
                 all={}, teacher={}, dpt={}, dft={}, sft={}, presets="shapes_hard", rows=HARD_ROWS, published=True,
                 teacher_runs=("teacher",)),
}
# The test size on the hard world: 16 visual tokens, so longer sequences.
SIZES["hard_test"] = dict(SIZES["test"], world=dict(shapes.WORLDS["hard"], n_train=24, n_test=4, image_size=32),
                          tower=dict(SIZES["test"]["tower"], vision=TINY_HARD),
                          all=dict(SIZES["test"]["all"], max_length=96), presets="shapes_hard", rows=HARD_ROWS,
                          teacher_runs=("teacher",))
DEFAULTS = dict(
    size="quick",              # test | quick | full | hard | hard_test (SIZES in experiments.py: world, budgets, rows)
    seeds=3,                   # seeds of the "main" rows
    ablation_seeds=1,          # seeds of every other row (matching, layers, VAT loss/form/weight/stage)
    seed_offset=0,             # first student seed (pilot runs use another range, e.g. 100)
    jobs=0,                    # pipelines at once (each stage a subprocess); 0: the size's default, 1: in this process
    rows="",                   # comma-separated row names or kinds (main, layers, pilot, ...); "": all but pilot rows
    out="out/experiments",     # runs go under <out>/<size>/
    results="",                # where the table (.md), the results (.json) and the chart (.png) go; "": results/ for
                               # the published sizes (quick, hard), <out>/<size>/results for the others
    data="",                   # an existing shapes directory (shapes.py) to use; "": generate <out>/<size>/shapes
    teacher="",                # an existing trained teacher to use; "": train one under <out>/<size>/teacher
    eval_limit=-1,             # items per eval file / subset / split; -1: the size's default, 0: all
    cr_protocol="likelihood",  # how CR is scored: likelihood (the captions' loss) | mcq (the letter answered)
)
SCORES = ["vqa", "cr", "pope_f1", "pope_acc", "align", "align_image", "align_text"]  # fractions in [0, 1]
NESTED = ["cr_subsets", "pope_splits", "reefknot", "vqa_types"]  # {name: fraction} per seed


def args(d):
    return [f"--{k}={v}" for k, v in d.items()]


def results_dir(opts):
    """--results, else results/ for a published size, else <out>/<size>/results: a test run must not overwrite the
    committed tables."""
    if opts["results"]:
        return opts["results"]
    return "results" if SIZES[opts["size"]].get("published") else os.path.join(opts["out"], opts["size"], "results")


def presets(size, stage):
    """The stage's config files: config/shapes_<stage>.py, then, for a size on another world, that world's layer
    over it (config/<presets>_<stage>.py: only what differs there)."""
    files = [os.path.join(ROOT, "config", f"shapes_{stage}.py")]
    if SIZES[size].get("presets", "shapes") != "shapes":
        files.append(os.path.join(ROOT, "config", f"{SIZES[size]['presets']}_{stage}.py"))
    return files


def size_rows(size):
    return SIZES[size].get("rows", ROWS)


def select_rows(size, names=""):
    """The size's rows named (by row or kind) in `names` (comma-separated), else all but the "pilot" kind."""
    want = set(names.split(",")) if names else None
    return [row for row in size_rows(size)
            if (want is None and row[1] != "pilot") or (want and {row[0], row[1]} & want)]


def stage_args(size, stage, **kw):
    """The stage's config files (presets), then the size's overrides, then this run's."""
    overrides = {**SIZES[size]["all"], **SIZES[size][stage], **kw}
    return [*presets(size, stage), *args(overrides)]


def teacher_runs(size):
    """The teacher's runs of train_sft.py: "teacher" (captions + instructions from scratch), then "teacher_it"
    (instruction tuning, config/shapes_teacher_it.py) unless the size's world keeps a one-run teacher."""
    return SIZES[size].get("teacher_runs", ("teacher", "teacher_it"))


def teacher_args(size, name, **kw):
    """A teacher run's arguments: run 2 layers its preset over run 1's, and takes run 1's size overrides (the test
    size's tiny LM) with its own on top."""
    files = presets(size, "teacher") + (presets(size, name) if name != "teacher" else [])
    overrides = {**SIZES[size]["all"], **SIZES[size]["teacher"], **SIZES[size].get(name, {}), **kw}
    return [*files, *args(overrides)]


def resolved_dft(overrides, size="quick"):
    import train_dft
    from run import configure_stage
    return configure_stage(train_dft.DEFAULTS, [*presets(size, "dft"), *args(overrides)], "", train_dft.__file__)


def load(path):
    with open(path) as file:
        return json.load(file)


def run(script, argv, out_path, product, jobs):
    """One stage, skipped when `product` exists and <out_path>.done.json records the same arguments (with a changed
    setting the stage runs again, into the same directory, which refuses a finished run with other settings: move
    it away first). In this process (jobs 1) or as a subprocess."""
    done = out_path + ".done.json"
    rec = load(done) if os.path.exists(done) and os.path.exists(product) else {}
    if rec.get("argv") == argv:
        return rec["wall_s"]
    t0 = time.time()
    if jobs == 1:
        mod = importlib.import_module(script[:-3])
        mod.main(argv)
    else:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        env = dict(os.environ)
        if not torch.cuda.is_available():  # CPU: share the cores instead of oversubscribing them
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        with open(out_path + ".log", "w") as log:
            proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        if proc.returncode:
            with open(out_path + ".log") as log:
                raise RuntimeError(f"{script} {' '.join(argv)} failed ({proc.returncode}):\n{log.read()[-3000:]}")
    wall = time.time() - t0
    with open(done, "w") as file:
        json.dump(dict(wall_s=wall, script=script, argv=argv), file)
    print(f"[{wall:.0f}s] {script} -> {out_path}", flush=True)
    return wall


def parallel(fns, jobs):
    if jobs == 1:
        return [fn() for fn in fns]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda fn: fn(), fns))


def metrics(report, cr_protocol, dft_dir=None, vat_on=False):
    """The table's numbers from an evaluate.py report (and the DFT log's last training VAT loss)."""
    cr = report["cr"]["likelihood" if "likelihood" in cr_protocol else "mcq"]
    pope = report["pope"]["generate"]  # POPE read as its own evaluate.py reads answers (tasks/pope.py, pope_reading)
    m = dict(counts=counts(report), vqa=report["vqa"]["accuracy"], cr=cr["avg"], pope_f1=pope["avg"]["f1"],
             pope_acc=pope["avg"]["accuracy"],
             cr_subsets={s: v["acc"] for s, v in cr["per_subset"].items()},
             pope_splits={s: v["f1"] for s, v in pope["per_split"].items()},
             vqa_types=dict(report["vqa"].get("per_type", {})))
    if "reefknot" in report:  # hallucination rates per task, and their mean
        m["reefknot"] = {t: v["hallucination_rate"] for t, v in report["reefknot"].items()
                         if isinstance(v, dict) and "hallucination_rate" in v}
    if "align" in report:
        m["align"] = report["align"]["cr"]["all_queries"]["vat_cos"]
        m["align_image"] = report["align"]["cr"]["image_queries"]["vat_cos"]
        m["align_text"] = report["align"]["cr"]["text_queries"]["flat_cos"]
    if dft_dir and vat_on:
        with open(os.path.join(dft_dir, "train_log.jsonl")) as f:
            m["vat_final"] = [r for r in map(json.loads, f) if r.get("vat") is not None][-1]["vat"]  # skipped: None
    return m


def summary(per_seed, key, sub=None):
    values = [scores[key][sub] if sub else scores[key] for scores in per_seed
              if scores.get(key) is not None and (sub is None or sub in scores[key])]
    if values:
        return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                    n=len(values))


def cell(stat, pct=True, digits=1, sci=False):
    scale, spec = (100 if pct else 1), f".{digits}{'e' if sci else 'f'}"  # sci: VAT losses go down to 1e-5
    if stat is None:
        return "-"
    return f"{scale * stat['mean']:{spec}}" + (f" ± {scale * stat['std']:{spec}}" if stat["n"] > 1 else "")


def chart(path, entries, title):
    """Horizontal bars of VQA and CR per row (%), with +- std whiskers; Pillow only."""
    label_w, width, bar, gap, top = 230, 900, 12, 10, 50
    height, scale = top + len(entries) * (2 * bar + gap) + 30, width - label_w - 70
    img = Image.new("RGB", (width, height), "white")
    draw, colors = ImageDraw.Draw(img), dict(VQA=(66, 133, 244), CR=(240, 150, 0))
    font = load_font(12)
    draw.text((10, 8), title, fill="black", font=font)
    for i, (label, color) in enumerate(colors.items()):
        draw.rectangle([10 + 60 * i, 28, 20 + 60 * i, 38], fill=color)
        draw.text((24 + 60 * i, 26), label, fill="black", font=font)
    for pct in range(0, 101, 25):
        x = label_w + scale * pct / 100
        draw.line([(x, top - 5), (x, height - 25)], fill=(220, 220, 220))
        draw.text((x - 8, height - 20), str(pct), fill="black", font=font)
    y = top
    for name, means in entries:
        draw.text((10, y + bar - 7), name, fill="black", font=font)
        for label, key in (("VQA", "vqa"), ("CR", "cr")):
            mean, std = (means[key]["mean"], means[key]["std"]) if means.get(key) else (0.0, 0.0)
            draw.rectangle([label_w, y, label_w + scale * mean, y + bar - 2], fill=colors[label])
            if std:
                draw.line([(label_w + scale * max(0, mean - std), y + bar // 2 - 1),
                           (label_w + scale * min(1, mean + std), y + bar // 2 - 1)], fill="black", width=2)
            draw.text((label_w + scale * min(1, mean + std) + 4, y - 1), f"{100 * mean:.1f}", fill="black",
                      font=font)
            y += bar
        y += gap
    img.save(path)


def train_all(opts, size, jobs, limit, base, rows, seeds, cfgs, shared):
    """Data, teacher, then (in parallel) the teacher's eval and the DPT runs, then the DFT -> SFT -> eval pipelines."""
    spec = {name: (dpt, dft) for name, _, dpt, dft in size_rows(opts["size"])}
    pipelines = sorted({(shared[name], seed) for name, kind, _, _ in rows for seed in seeds(kind)})
    dpts = sorted({(spec[name][0], seed) for name, seed in pipelines})
    data = opts["data"] or os.path.join(base, "shapes")
    if not os.path.exists(os.path.join(data, "meta.json")):
        shapes.generate(data, **size["world"])
    tower = os.path.join(data, "vision_tower")
    if not os.path.exists(os.path.join(tower, "model.safetensors")):  # the world's "pretrained SigLIP"
        t0 = time.time()
        shapes_tower.pretrain_tower(data, tower, **size["tower"])
        print(f"[{time.time() - t0:.0f}s] vision tower -> {tower}", flush=True)
    pretrain, instruct = os.path.join(data, "pretrain.json"), os.path.join(data, "instruct.json")
    teacher, walls = opts["teacher"] or os.path.join(base, "teacher"), {"teacher": 0.0}
    if opts["teacher"] and not os.path.exists(os.path.join(teacher, "model.safetensors")):
        raise FileNotFoundError(f"--teacher={teacher}: no checkpoint there (omit --teacher to train one)")
    if not opts["teacher"]:  # run 1 (captions + instructions), then, where the size has it, instruction tuning
        runs, start = teacher_runs(opts["size"]), dict(data=f"{pretrain},{instruct}")
        for i, name in enumerate(runs):
            out = teacher if i == len(runs) - 1 else f"{teacher}_pt"  # the last run is the teacher
            kw = dict(start, seed=0, vision_model=tower, out_dir=out)
            walls["teacher"] += run("train_sft.py", teacher_args(opts["size"], name, **kw), out,
                                    os.path.join(out, "model.safetensors"), jobs)
            start = dict(init_from=out, data=instruct)
    ev = dict(tasks="vqa,cr,pope,reefknot,align", cr_protocol=opts["cr_protocol"], limit=limit, data=data,
              batch_size=64)  # prompts per forward: on a CPU the per-op overhead dominates, so fewer, larger batches
    t_eval = os.path.join(base, "teacher_eval")
    dpt_dir = lambda variant, seed: os.path.join(base, f"seed{seed}", f"dpt_{variant}")

    def dpt_job(variant, seed):
        out = dpt_dir(variant, seed)
        return run("train_dpt.py", stage_args(opts["size"], "dpt", teacher=teacher, out_dir=out, seed=seed,
                                              data=pretrain, **DPT[variant]),
                   out, os.path.join(out, "model.safetensors"), jobs)

    def pipeline(name, seed):
        run_dir, (variant, dft), dft_cfg = os.path.join(base, f"seed{seed}", name), spec[name], cfgs[name]
        return dict(
            dft=run("train_dft.py", stage_args(opts["size"], "dft", teacher=teacher, out_dir=f"{run_dir}/dft",
                                               seed=seed, init_from=dpt_dir(variant, seed), data=instruct, **dft),
                    f"{run_dir}/dft", f"{run_dir}/dft/model.safetensors", jobs),
            sft=run("train_sft.py", stage_args(opts["size"], "sft", init_from=f"{run_dir}/dft",
                                               out_dir=f"{run_dir}/sft", seed=seed, data=instruct),
                    f"{run_dir}/sft", f"{run_dir}/sft/model.safetensors", jobs),
            eval=run("evaluate.py", args(dict(ev, model=f"{run_dir}/sft", teacher=teacher, out=f"{run_dir}/eval",
                                              matching=dft_cfg["matching"], student_layers=dft_cfg["student_layers"],
                                              teacher_layers=dft_cfg["teacher_layers"])),
                     f"{run_dir}/eval", f"{run_dir}/eval/report.json", jobs))

    teacher_eval = lambda: run("evaluate.py", args(dict(ev, tasks="vqa,cr,pope,reefknot", model=teacher, out=t_eval)),
                               t_eval, os.path.join(t_eval, "report.json"), jobs)
    first_walls = parallel([teacher_eval] + [lambda v=v, s=s: dpt_job(v, s) for v, s in dpts], jobs)
    walls["teacher_eval"] = first_walls[0]
    walls.update({f"dpt_{variant}/seed{seed}": wall for (variant, seed), wall in zip(dpts, first_walls[1:])})
    pipeline_walls = parallel([lambda p=p: pipeline(*p) for p in pipelines], jobs)
    walls.update({f"{name}/seed{seed}": wall for (name, seed), wall in zip(pipelines, pipeline_walls)})
    return walls, t_eval, len(pipelines), len(dpts)


def main(argv=None):
    opts = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    if opts["size"] not in SIZES:
        raise ValueError(f"--size={opts['size']}: use one of {list(SIZES)}")
    size, t_start, base = SIZES[opts["size"]], time.time(), os.path.join(opts["out"], opts["size"])
    opts["results"] = results_dir(opts)
    jobs = opts["jobs"] or size["jobs"]
    limit = size["eval_limit"] if opts["eval_limit"] < 0 else opts["eval_limit"]
    all_rows, rows = size_rows(opts["size"]), select_rows(opts["size"], opts["rows"])
    seeds = lambda kind: list(range(opts["seed_offset"], opts["seed_offset"] + (opts["seeds"] if kind == "main"
                                                                                else opts["ablation_seeds"])))
    # rows with the same DPT variant and resolved DFT config share runs (decided over all rows: stable dirs)
    cfgs, shared, first = {}, {}, {}
    for name, kind, dpt, dft in all_rows:
        cfgs[name] = resolved_dft(dft, opts["size"])
        shared[name] = first.setdefault((dpt, json.dumps(cfgs[name], sort_keys=True)), name)
    walls, t_eval, n_pipe, n_dpt = train_all(opts, size, jobs, limit, base, rows, seeds, cfgs, shared)

    t_m = metrics(load(os.path.join(t_eval, "report.json")), opts["cr_protocol"])
    teacher_setting = " then ".join(" + ".join(os.path.relpath(p, ROOT) for p in presets(opts["size"], name))
                                    for name in teacher_runs(opts["size"]))
    teacher_setting += ", trained once, shared"
    results = [dict(name="teacher", kind="teacher", setting=teacher_setting,
                    shared_with=None, seeds=[0], per_seed=[dict(seed=0, wall_s=walls["teacher"] + walls["teacher_eval"],
                                                                **t_m)])]
    for name, kind, dpt, dft in rows:
        per, run_name = [], shared[name]
        for seed in seeds(kind):
            run_dir = os.path.join(base, f"seed{seed}", run_name)
            scores = metrics(load(f"{run_dir}/eval/report.json"), opts["cr_protocol"], f"{run_dir}/dft",
                             cfgs[name]["vat_weight"] > 0)
            wall = walls[f"dpt_{dpt}/seed{seed}"] + sum(walls[f"{run_name}/seed{seed}"].values())
            per.append(dict(seed=seed, dir=run_dir, wall_s=wall, **scores))
        setting = f"DPT {dpt}; DFT " + (" ".join(f"{k}={v}".replace(" ", "") for k, v in dft.items()) or "recipe")
        results.append(dict(name=name, kind=kind, setting=setting, shared_with=None if run_name == name else run_name,
                            seeds=seeds(kind), overrides=dict(dpt=DPT[dpt], dft=dft), per_seed=per))
    subsets = list(results[0]["per_seed"][0]["cr_subsets"])
    for row in results:
        row["mean"] = {k: summary(row["per_seed"], k) for k in SCORES + ["vat_final", "wall_s"]}
        for key in NESTED:
            names = list(dict.fromkeys(n for scores in row["per_seed"] for n in scores.get(key, {})))
            row["mean"][key] = {n: summary(row["per_seed"], key, n) for n in names}
    compute = sum(v if isinstance(v, float) else sum(v.values()) for v in walls.values())
    wall = time.time() - t_start
    header = (f"{n_pipe} student pipelines (DFT -> SFT -> eval) on {n_dpt} DPT runs, jobs={jobs}, device "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}. Wall time of this call {wall:.0f} s; all stages' "
              f"own wall times summed (runs reused from earlier calls included) {compute:.0f} s. Eval limit "
              f"{limit or 'none'} items per file / subset / split.")
    write_results(opts, results, subsets, header,
                  dict(options=opts, jobs=jobs, eval_limit=limit, wall_s=wall, compute_s=compute, stage_walls=walls))
    return results


def write_results(opts, results, subsets, header, info):
    proto = "likelihood" if "likelihood" in opts["cr_protocol"] else "mcq"
    cols = (["row", "setting", "seeds", "n (skipped)", "VQA", f"CR avg ({proto})"] + subsets +
            ["POPE F1", "Reefknot halluc. (mean)", "align CR (paper VAT)", "align CR (img q)", "align CR (text q)",
             "final VAT loss (DFT)", "wall (s)"])
    prefix = SIZES[opts["size"]].get("presets", "shapes")
    world = "hard shapes world" if prefix == "shapes_hard" else "shapes world"
    seeds_of = lambda row: str(len(row["seeds"])) + (f" (runs of {row['shared_with']})" if row["shared_with"] else "")
    # the items behind each task's figures and the skipped ones (a missing or unreadable image), per distinct seed
    counts_of = lambda row: " / ".join(dict.fromkeys(p.get("counts", "-") for p in row["per_seed"]))
    lines = [f"# CompoDistill on the {world}, size `{opts['size']}`", "", header, "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in results:
        means = row["mean"]
        cells = ([row["name"], row["setting"], seeds_of(row), counts_of(row), cell(means["vqa"]), cell(means["cr"])] +
                 [cell(means["cr_subsets"].get(s)) for s in subsets] +
                 [cell(means["pope_f1"]), cell(means["reefknot"].get("mean")), cell(means["align"], digits=2),
                  cell(means["align_image"], digits=2), cell(means["align_text"], digits=2),
                  cell(means["vat_final"], False, 2, sci=True), cell(means["wall_s"], False, 0)])
        lines.append("| " + " | ".join(cells) + " |")
    # relations and hallucination: the main rows, each number on its own item set
    rel_types = [t for t in ("rel_yn", "rel_query", "rel_what", "rel_choice") if t in results[0]["mean"]["vqa_types"]]
    splits = list(results[0]["mean"]["pope_splits"])
    tasks = [t for t in ("yesno", "multichoice", "vqa", "mean") if t in results[0]["mean"]["reefknot"]]
    rcols = (["row", "seeds", "n (skipped)", "replace_rel"] + [f"VQA {t}" for t in rel_types] +
             [f"POPE F1 {s}" for s in splits] + ["POPE acc"] + [f"Reefknot halluc. {t}" for t in tasks])
    lines += ["", "## Relations and hallucination (main rows)", "", "| " + " | ".join(rcols) + " |",
              "|" + "---|" * len(rcols)]
    for row in results:
        if row["kind"] not in ("teacher", "main"):
            continue
        means = row["mean"]
        lines.append("| " + " | ".join([row["name"], seeds_of(row), counts_of(row),
                                        cell(means["cr_subsets"].get("replace_rel"))] +
                                        [cell(means["vqa_types"].get(t)) for t in rel_types] +
                                        [cell(means["pope_splits"].get(s)) for s in splits] +
                                        [cell(means["pope_acc"])] +
                                        [cell(means["reefknot"].get(t)) for t in tasks]) + " |")
    first = opts["seed_offset"]
    lines += ["", f"Scores in %, mean ± sample std over seeds {first}..{first or ''}{'+' if first else ''}n-1. "
              f"CR: the SugarCrepe-style subsets by {proto}. POPE: generated answers read as POPE's evaluate.py "
              "reads them, F1 "
              "(mean over the splits) and accuracy. Reefknot: hallucination rate (1 - accuracy) per task and their "
              "mean (lower is better). VQA: VQAv2's reading (normalised exact match against the one answer); rel_*: "
              "accuracy on the test questions of that kind. n (skipped): the items each task's figures rest on, and "
              "those skipped (a missing or unreadable image). align: on the CR captions, on each row's own DFT "
              "layer sets and matching; paper VAT: 1 - the "
              "paper-form VAT distance (all queries, flattened; the training default); img q: 1 - the reference "
              "code's form (image queries, column-pooled); text q: cosine of the caption tokens' attention over the "
              "image. Final VAT loss: the DFT run's last logged training value (scales differ across vat_loss and VAT "
              "forms; '-' when vat_weight=0). wall: DPT + DFT + SFT + eval of one seed (a shared DPT run counted in "
              "full); teacher: training + eval. Rows whose settings resolve to the same config reuse those runs "
              "(seeds column).", "",
              f"DPT variants (overrides on config/{prefix}_dpt.py, which is KD + TAF): " +
              "; ".join(f"{k}: {v or 'no overrides'}" for k, v in DPT.items()), ""]
    os.makedirs(opts["results"], exist_ok=True)
    with open(os.path.join(opts["results"], f"{prefix}_table.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(opts["results"], f"{prefix}_results.json"), "w") as f:
        json.dump(dict(info, rows=results), f, indent=1)
    chart(os.path.join(opts["results"], f"{prefix}_chart.png"),
          [(row["name"] + (f" (= {row['shared_with']})" if row["shared_with"] else ""), row["mean"])
           for row in results],
          f"{world[0].upper() + world[1:]} ({opts['size']}): VQA and CR ({proto} avg), %, mean ± std over seeds")
    print("\n".join(lines) + f"\n-> {opts['results']}/{prefix}_table.md, {prefix}_results.json, {prefix}_chart.png")


if __name__ == "__main__":
    cli(main)
