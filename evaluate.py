"""
Evaluation: VQA, compositional reasoning (SugarCrepe-style CR, Winoground/BiVLC-style), POPE, Reefknot, and the paper's
diagnosis, the teacher-student attention alignment with its heat maps (alignment.py).

    python evaluate.py --model=out/shapes/sft --teacher=out/shapes/teacher --data=out/shapes --heatmaps=4
    python evaluate.py --compare=teacher=out/shapes/teacher,sft=out/shapes/sft --teacher=out/shapes/teacher \
        --data=out/shapes --out=out/shapes/eval        # several models, one table
    python evaluate.py --predictions=answers/ --data=bench/     # answers made elsewhere (vLLM, lmms-eval...): no model

writes report.json (every number, fractions in [0, 1]) and report.md to --out (default <model>_eval, beside the
checkpoint: never inside it, where the next save of a resumed run would replace it) and prints the table. The report
is rewritten after each task: a run stopped by Ctrl-C keeps the tasks it finished and says "status": "interrupted".
From Python: report = evaluate(model, "out/shapes", teacher=teacher, tasks="cr,align"), with the settings of DEFAULTS
below as keywords.

Inputs (shapes.py writes the first three under <data>/test/; real benchmarks in the same formats work with
--image_folder naming the folder(s) of their images: several comma-separated, searched in order; a name without an
extension is also tried as .jpg / .png / .jpeg):
  vqa.jsonl          {"question" | "text", "answer" (str) | "answers" (list of str or {"answer"}), "image"}, optional
                     "question_id", "answer_type" ("yes/no" also gets the verdict figure, tasks/vqa.py)
  cr/{subset}.json   SugarCrepe: {id: {"filename", "caption", "negative_caption"}}
  pope_*.json[l]     POPE's layout (coco_pope_*.json: {"question_id", "image", "text", "label"}) or {"question",
                     "answer", "image", "category"}; a label other than "yes" / "no" is an error naming file and line
  winoground.jsonl   {"image_0", "image_1", "caption_0", "caption_1"} (Winoground) or
                     {"image", "negative_image", "caption", "negative_caption"} (BiVLC)
  reefknot/          Reefknot's layout: YESNO.jsonl, Multichoice.jsonl, VQA.jsonl, one {"image_id", "query_prompt",
                     "label", "relation_type"} a line; the image is <image_id>.jpg (or .png) in --reefknot_image_folder
                     (else --image_folder; for the shapes layout, <data>/images): Visual Genome's two folders as
                     --reefknot_image_folder=VG_100K,VG_100K_2. --reefknot_dir points at the official download.
An item whose image is missing or is not an image is skipped and counted: every table shows each task's n and the
skipped count (report.json "skipped"), and a warning names one; a test file none of whose images can be read stops
the run. A missing label / answer field is an error naming the file and line.

--predictions=DIR scores answers made elsewhere, with no model and no images (tasks vqa, pope, reefknot): for each
benchmark file scored, DIR holds a file of the same name (vqa.jsonl, coco_pope_random.json, YESNO.jsonl...) with one
JSON object a line, {"text": answer} (or "answer") plus "question_id" where the benchmark has one (LLaVA's answer
files). Lines are matched by question_id when both files have it, else by position; a count that differs, an unknown
or unanswered question_id stops with one line naming the file.

Each benchmark is a file of its own in tasks/ (vqa.py, cr.py (SugarCrepe), pope.py, winoground.py, reefknot.py) with
its reader, its scorer and its metric; its docstring says how its answers are read. Where a benchmark has an official
script, its answers are read as that script reads them, and the report says so per task ("reading"); our stricter
readings are extra figures beside them, never in their place (docs/evaluation.md).
  align  (needs a teacher) see alignment.py: in the matched layers, 1 - the paper's VAT distance (all queries, the
         training default), 1 - the reference code's (image queries), and the text queries' similarity.
Every prompt goes through data.tokenize_conversation with a last human turn, so it ends exactly as in training.
Precision: the models compute in the dtype their weights are loaded in (--dtype; auto = bfloat16 on CUDA, float32 on
the CPU), without autocast, as sample.py does; a VLM passed in from Python computes in its own dtype.
For real models set answer_suffix (e.g. LLaVA's "\nAnswer the question using a single word or phrase.") and
caption_prompt to what they were trained with. The shapes models are never trained on multiple choice: their
MCQ scores sit near chance; the likelihood protocol is the informative one there.
"""

import os
import signal
import sys
import time
from collections import OrderedDict

import torch
from tqdm import tqdm

from alignment import align_task, heatmap_task, matched_layers
from checkpoint import find_checkpoint, open_checkpoint
from common import pick_device, resolve_dtype, why
from data import IGNORE_INDEX, collate, decode_answer, load_image, tokenize_conversation
from model import VLM
from report import compare_table, report_markdown, write_comparison, write_report
from tasks import BENCHMARKS, cr, pope, reefknot, vqa, winoground
from tasks.common import CAPTION_PROMPT, find_files, image_folders

TASKS = ["vqa", "cr", "pope", "wino", "reefknot", "align"]
ANSWER_TASKS = ["vqa", "pope", "reefknot"]  # the tasks --predictions scores from answer files


# -----------------------------------------------------------------------------
# running the model: prompts -> batches -> answers / log-probabilities / attention


class Runner:
    """The model, its tokenizer and image processor, a small image cache, and the batch loop. The model computes in
    the dtype of its weights (no autocast): the dtype it was loaded in decides, as in sample.py."""

    def __init__(self, model, image_folder, batch_size=16, progress=True, cache_size=256):
        if model.tokenizer is None or model.image_processor is None:
            raise ValueError("the model has no tokenizer / image_processor attached; load it with "
                             "VLM.from_pretrained(<checkpoint dir>) or set model.tokenizer / model.image_processor")
        self.model, self.tok, self.proc = model, model.tokenizer, model.image_processor
        self.folder, self.batch_size, self.progress = image_folder, batch_size, progress
        self.device = next(model.parameters()).device
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self._cache, self._cache_size = OrderedDict(), cache_size

    def pixels(self, rel):
        if rel not in self._cache:
            path = os.path.join(self.folder, rel)
            try:
                img = load_image(path)
            except (OSError, ValueError, SyntaxError) as e:  # damaged past what the check before the run sees
                raise ValueError(f"{path}: cannot be read as an image ({why(e)}); replace "
                                 "the file, or remove its items from the test file") from e
            self._cache[rel] = self.proc(images=img, return_tensors="pt").pixel_values[0]
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(rel)
        return self._cache[rel]

    def sample(self, prompt, image, answer=None):
        """One tokenized sample: a human turn (image first, LLaVA style) [+ the answer, supervised]."""
        conv = [{"from": "human", "value": prompt}] + ([{"from": "gpt", "value": answer}] if answer is not None else [])
        ids, labels = tokenize_conversation(conv, self.tok, self.model.num_image_tokens, True)
        return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), pixel_values=self.pixels(image))

    def batches(self, specs, desc):
        """Yield (collated batch on device, slice of specs); spec = (prompt, image, answer or None)."""
        bar = tqdm(range(0, len(specs), self.batch_size), desc=desc, disable=not self.progress, leave=False)
        for i in bar:
            chunk = specs[i:i + self.batch_size]
            b = collate([self.sample(*s) for s in chunk], self.pad_id)
            yield {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()}, chunk

    @torch.no_grad()
    def generate(self, specs, max_new_tokens, desc):
        out = []
        for b, _ in self.batches(specs, desc):
            new = self.model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens)
            out += [decode_answer(self.tok, row) for row in new]
        return out

    def _hidden(self, b):
        m = self.model
        return m.hidden_states(b["input_ids"], b["attention_mask"], m.image_embeds(b["pixel_values"]))

    @torch.no_grad()
    def loglik(self, specs, desc):
        """Mean log-probability of each spec's answer tokens (its <eos> included) given image and prompt."""
        out = []
        for b, _ in self.batches(specs, desc):
            h = self._hidden(b)
            pred = b["labels"][:, 1:] != IGNORE_INDEX
            logits = self.model.logits(h[:, :-1][pred])
            lp = logits.float().log_softmax(-1).gather(-1, b["labels"][:, 1:][pred][:, None])[:, 0]
            rows = pred.nonzero()[:, 0]
            sums = torch.zeros(len(pred), device=lp.device).index_add_(0, rows, lp)
            out += (sums / pred.sum(1).clamp(min=1)).tolist()
        return out

    def first_token_ids(self, word):
        """Ids that start the answer `word` after the prompt (lower- and capitalised spellings)."""
        ids = set()
        for w in (word, word.capitalize()):
            enc = self.tok(" " + w, add_special_tokens=False).input_ids  # data.CHAT.answer_prefix is " "
            if enc and enc[0] != self.tok.unk_token_id:
                ids.add(enc[0])
        return sorted(ids)

    @torch.no_grad()
    def first_token_logprobs(self, specs, words, desc):
        """For each spec (a prompt), log P(answer starts with word) for each word: (N, len(words))."""
        groups = [self.first_token_ids(w) for w in words]
        if not all(groups):
            raise ValueError(f"the tokenizer cannot spell {words}")
        out = []
        for b, _ in self.batches(specs, desc):
            h = self._hidden(b)
            last = b["attention_mask"].sum(1) - 1
            logits = self.model.logits(h[torch.arange(len(last)), last])
            lp = logits.float().log_softmax(-1)
            out.append(torch.stack([lp[:, g].logsumexp(-1) for g in groups], 1).cpu())
        return torch.cat(out).tolist()


# -----------------------------------------------------------------------------
# the whole evaluation


def _load(m, dtype=None):
    """(VLM, its directory) from a checkpoint directory (ours or a Hugging Face LLaVA one), or (m, None) for a VLM."""
    if isinstance(m, str):
        return VLM.from_pretrained(m, dtype=dtype), find_checkpoint(m) or m
    return m, None


def evaluate(model, data, teacher=None, out="", progress=True, name=None, teacher_name=None, **settings):
    """
    Run the tasks on the test sets under `data` and return the report dict; with `out`, also write report.json,
    report.md and the heat maps there (rewritten after each task: an interrupted run leaves the tasks it finished,
    marked "status": "interrupted"). `model` / `teacher`: a VLM or a checkpoint directory; model None with
    predictions=DIR scores the answer files in DIR instead (vqa, pope, reefknot). `settings`: the evaluation settings
    of DEFAULTS (tasks, limit, heatmaps, prompts, files...). "align" needs a teacher and is skipped (with a note)
    without one.
    """
    unknown = sorted(set(settings) - set(DEFAULTS) | set(settings) & CLI_ONLY)
    if unknown:
        raise ValueError(f"unknown evaluation settings {unknown}: use those of evaluate.DEFAULTS")
    o = {k: v for k, v in dict(DEFAULTS, **settings).items() if k not in CLI_ONLY}
    tasks, limit, batch_size, heatmaps = o["tasks"], o["limit"] or None, o["batch_size"], o["heatmaps"]
    answer_suffix, caption_prompt, pred_dir = o["answer_suffix"], o["caption_prompt"], o["predictions"]
    data_dir = data
    t_start = time.time()
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    protocols = o["cr_protocol"]
    protocols = [p.strip() for p in protocols.split(",")] if isinstance(protocols, str) else list(protocols)
    bad = [t for t in tasks if t not in TASKS] + [p for p in protocols if p not in ("mcq", "likelihood")]
    if bad:
        raise ValueError(f"unknown task / CR protocol {bad}: tasks are {TASKS}, protocols mcq and likelihood")
    if heatmaps and not out:
        raise ValueError("heatmaps need an output directory (out=...)")
    notes = []
    if pred_dir:
        if not os.path.isdir(pred_dir):
            raise FileNotFoundError(f"--predictions={pred_dir}: no such folder; give the folder of answer files")
        if model is not None or heatmaps:
            raise ValueError("--predictions scores answer files without a model: leave out the model and --heatmaps")
        dropped = [t for t in tasks if t not in ANSWER_TASKS]
        tasks = [t for t in tasks if t in ANSWER_TASKS]
        if dropped:
            notes.append(f"{', '.join(dropped)} not scored: --predictions scores {', '.join(ANSWER_TASKS)} only")
        if not tasks:
            raise ValueError(f"--predictions: none of --tasks is one of {ANSWER_TASKS}")
        r, model_path, teacher = None, None, None
    else:
        if model is None:
            raise ValueError("no model to evaluate: give a VLM or a checkpoint directory "
                             "(or predictions=<answers dir>)")
        model, model_path = _load(model)
        if model_path and torch.cuda.is_available():  # loaded here: use the GPU (a passed-in model stays put)
            model.cuda()
        model.eval()
    teacher, teacher_path = _load(teacher) if teacher is not None else (None, None)
    if teacher is not None:
        teacher.eval()
        teacher.to(next(model.parameters()).device)
    folders = None if pred_dir else image_folders(o["image_folder"], data_dir)
    if not pred_dir:
        r = Runner(model, folders[0], batch_size, progress)
    files = find_files(data_dir, o["vqa_file"], o["cr_dir"], o["pope_dir"], o["wino_file"], o["reefknot_dir"])
    report = dict(model=name or model_path or (f"answers in {pred_dir}" if pred_dir else type(model).__name__),
                  teacher=teacher_name or teacher_path, data=data_dir, predictions=pred_dir or None,
                  image_folder=o["image_folder"] or data_dir, tasks=tasks, limit=limit,
                  device=str(r.device) if r else "none", status="running", notes=notes, skipped={}, seconds={})

    def need(task, key):
        if not files[key]:
            raise FileNotFoundError(f"task {task}: no test file under {data_dir} (looked for test/{key}...); "
                                    f"generate the shapes world (python shapes.py), pass its path, or leave the task "
                                    f"out of --tasks")
        return files[key]

    for task in tasks:  # every test file is found before the first task runs, not after an hour of the others
        if task != "align":
            need(task, task)
    # Reefknot names images by id; the shapes world keeps them in <data>/images
    shapes_images = os.path.join(data_dir, "images")
    rk_folders = None if pred_dir else image_folders(o["reefknot_image_folder"] or o["image_folder"],
                                                     shapes_images if os.path.isdir(shapes_images) else data_dir)
    cache = {}

    def load(task):
        if task not in cache:
            extra = dict(predictions=pred_dir) if task in ANSWER_TASKS else {}
            cache[task] = BENCHMARKS[task].load(need(task, task), rk_folders if task == "reefknot" else folders,
                                                limit, **extra)
            report["skipped"][task] = cache[task][1]
        return cache[task][0]

    items = lambda task: load(task) if files[task] else None  # noqa: E731  (the align task and heat maps use both)

    if pred_dir:  # every answer file read and matched before anything is written
        for task in tasks:
            load(task)
    if "align" in tasks and teacher is None:
        tasks.remove("align")
        report["notes"].append("align skipped: it needs a teacher (--teacher)")
    pairs = None
    if "align" in tasks or heatmaps:
        pairs = matched_layers(model, teacher, o["student_layers"], o["teacher_layers"], o["matching"] or None)
        report["matched_layers"] = dict(student=pairs.student, teacher_windows=pairs.windows)

    def save():
        if out:
            write_report(out, report)

    save()  # an older report in `out` is replaced now, not at the end: what is there is always this run's
    try:
        for task in tasks:
            t0 = time.time()
            if task == "vqa":
                report["vqa"] = vqa.run(r, load("vqa"), answer_suffix)
            elif task == "cr":
                report["cr"] = cr.run(r, load("cr"), protocols, o["mcq_prompt"], caption_prompt)
            elif task == "pope":
                report["pope"] = pope.run(r, load("pope"), answer_suffix)
            elif task == "wino":
                report["wino"] = winoground.run(r, load("wino"), caption_prompt)
            elif task == "reefknot":
                report["reefknot"] = reefknot.run(r, load("reefknot"))
            elif task == "align":
                report["align"] = {}
                align_task(r, teacher, pairs, items, answer_suffix, caption_prompt, report["align"])
            report["seconds"][task] = round(time.time() - t0, 2)
            save()

        if heatmaps:
            t0 = time.time()
            report["heatmaps"] = heatmap_task(r, teacher, pairs, items, heatmaps, answer_suffix, caption_prompt, out)
            report["seconds"]["heatmaps"] = round(time.time() - t0, 2)
    except BaseException as e:  # Ctrl-C, SIGTERM (main) or a crash: keep what finished, say that the run did not
        report["status"] = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else \
            f"failed ({type(e).__name__})"
        save()
        raise
    report["seconds"]["total"] = round(time.time() - t_start, 2)
    report["status"] = "complete"
    save()
    return report


# -----------------------------------------------------------------------------
# command line

DEFAULTS = dict(
    model="",                 # checkpoint directory: any stage's out_dir, or a Hugging Face LLaVA directory
    compare="",               # instead of model: "name=dir,name=dir,..." -> <out>/<name>/ each + <out>/report.md table
    teacher="",               # teacher checkpoint directory: enables "align" and the teacher rows of heat maps
    data="out/shapes",        # folder holding test/ (shapes) or the benchmark files
    out="",                   # where the report goes (default: <model>_eval, beside the checkpoint, not inside it)
    dtype="auto",             # the models load and compute in it (no autocast): auto = bfloat16 on CUDA, float32
                              # on CPU; or float32 / bfloat16
    tasks="vqa,cr,pope,reefknot,align",  # any of vqa, cr, pope, wino, reefknot, align
    limit=0,                  # >0: items per VQA file / CR subset / POPE split / Winoground file / Reefknot file
    batch_size=16,            # prompts per forward
    heatmaps=0,               # number of attention heat-map PNGs (half VQA, half CR items)
    cr_protocol="mcq,likelihood",  # CR protocols: mcq and / or likelihood
    image_folder="",          # the folder(s) the files' image paths are relative to, comma-separated, searched in
                              # order (default: data)
    predictions="",           # instead of a model: a folder of answer files named as the benchmark files (vqa.jsonl,
                              # coco_pope_random.json, YESNO.jsonl...), one {"text", "question_id"} a line
    student_layers=None,      # the layer pairs to align (default: the student's training config, else presets)
    teacher_layers=None,      # (as student_layers)
    matching="",              # group | simple | adaptive (default: the student's training config)
    answer_suffix="",         # appended to VQA / POPE questions (LLaVA: "\nAnswer the question using a single word
                              # or phrase.")
    caption_prompt=CAPTION_PROMPT,  # the prompt CR captions are scored after
    mcq_prompt=cr.MCQ_PROMPT,    # CR's multiple-choice question ({a}, {b}: the two captions)
    vqa_file="",              # the files, when they are not where shapes.py puts them under data:
    cr_dir="",                # a VQA .jsonl, a folder of SugarCrepe .json subsets,
    pope_dir="",              # a folder of POPE files,
    wino_file="",             # a Winoground / BiVLC .jsonl
    reefknot_dir="",          # a folder with Reefknot's YESNO.jsonl, Multichoice.jsonl, VQA.jsonl
    reefknot_image_folder="", # where Reefknot's <image_id>.jpg are, when not image_folder (e.g. COCO for POPE): Visual
                              # Genome's two folders, comma-separated (VG_100K,VG_100K_2); shapes: <data>/images
)
CLI_ONLY = {"model", "compare", "teacher", "data", "out", "dtype"}  # the rest are evaluate()'s settings


def default_out(cfg):
    """Where the report goes without --out: beside the checkpoint (<model>_eval), never inside it, where the next
    save of a resumed run would replace it; for --predictions, <predictions>_eval."""
    return os.path.normpath(cfg["model"] or cfg["predictions"]) + "_eval"


def compare_runs(spec):
    """[(name, checkpoint dir)] from --compare="name=dir,...", every directory checked before the first model runs."""
    runs = [tuple(x.strip().split("=", 1)) for x in spec.split(",")]
    if any(len(r) != 2 or not r[0] or not r[1] for r in runs):
        raise ValueError(f"--compare={spec!r}: write name=dir pairs separated by commas")
    names = [n for n, _ in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--compare: the name {dup[0]!r} is given twice; give each model its own name")
    for _, path in runs:  # a typo in the last path must not cost the evaluation of the first
        open_checkpoint(path)
    return runs


def main(argv=None):
    """One model (--model, report in --out or <model>_eval), several (--compare="name=dir,...": each into
    <out>/<name>, plus one comparison table in <out>/report.md), or a folder of answers (--predictions). Returns the
    report(s)."""
    from configurator import configure
    cfg = configure(dict(DEFAULTS), sys.argv[1:] if argv is None else argv, __doc__, [__file__])
    if argv is None:  # the command line: SIGTERM stops the run as Ctrl-C does, so the report says it was interrupted
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if sum(bool(cfg[k]) for k in ("model", "compare", "predictions")) != 1:
        raise ValueError("give one of --model=<checkpoint dir>, --compare=name=dir,name=dir with --out=<dir>, or "
                         "--predictions=<folder of answer files>")
    if cfg["compare"] and not cfg["out"]:
        raise ValueError("--compare needs --out=<dir> for the comparison table")
    opts = {k: v for k, v in cfg.items() if k not in CLI_ONLY}
    if cfg["predictions"]:
        out = cfg["out"] or default_out(cfg)
        rep = evaluate(None, cfg["data"], out=out, **opts)
        print(report_markdown(rep))
        print(f"-> {out}/report.json, report.md")
        return rep
    runs = compare_runs(cfg["compare"]) if cfg["compare"] else [(None, cfg["model"])]
    device = pick_device()
    dtype = resolve_dtype(cfg["dtype"], device)
    teacher, teacher_path = _load(cfg["teacher"], dtype) if cfg["teacher"] else (None, None)
    if teacher is not None:
        teacher.to(device)
    reports = {}
    write_table = lambda status: write_comparison(cfg["out"], cfg["data"], reports, len(runs), status)  # noqa: E731

    if cfg["compare"]:
        write_table("running")  # an older table in --out is replaced now, not when the last model is done
    for name, path in runs:
        model, path = _load(path, dtype)
        # the teacher compared with itself says nothing: evaluate it alone (its heat maps show its own attention)
        own = teacher is not None and os.path.realpath(path) == os.path.realpath(teacher_path)
        out = os.path.join(cfg["out"], name) if name else cfg["out"] or default_out(cfg)
        try:
            rep = evaluate(model.to(device), cfg["data"], teacher=None if own else teacher, out=out, name=path,
                           teacher_name=None if own else cfg["teacher"] or None, **opts)
        except BaseException:
            if cfg["compare"]:
                write_table("interrupted")
            raise
        print(report_markdown(rep))
        print(f"-> {out}/report.json, report.md")
        reports[name or path] = rep
        if cfg["compare"]:
            write_table("running" if len(reports) < len(runs) else "")
        del model
    if not cfg["compare"]:
        return next(iter(reports.values()))
    print(compare_table(reports))
    print(f"-> {cfg['out']}/report.md")
    return reports


if __name__ == "__main__":
    from configurator import cli
    cli(main)
