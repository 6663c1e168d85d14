"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_evaluate.py

evaluate.py: the runner (likelihood scoring on a model trained to say one caption, the dtype it computes in), an
end-to-end run (all tasks, heat map, CLI) on a tiny shapes world with tiny checkpoints, skipped items, --predictions,
--compare and interrupted runs. Each benchmark's reader and scorer: tests/test_tasks_<benchmark>.py.
"""
import copy
import json
import math
import os

import pytest
import torch
from PIL import Image

import alignment
import evaluate as ev
import shapes
from conftest import llm_cfg, vision_cfg, write_huge_png, write_lines, write_reefknot_layout
from data import collate
from attention_distill import LayerPairs, VATSettings
from model import VLM, TeacherStudent, VLMConfig
from report import compare_table, report_markdown
from tasks import common, cr, pope, reefknot, vqa

IMAGE_SIZE, PATCH = 32, 8  # shapes needs image_size >= 8 * grid (3): 32 px / 8 px patches = 16 image tokens


# -----------------------------------------------------------------------------
# tiny shapes world and models


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes") / "w")
    shapes.generate(out, n_train=20, n_test=10, image_size=IMAGE_SIZE, progress=False)
    # a Winoground-style file from two test images and their true relational captions
    cr = json.load(open(os.path.join(out, "test", "cr", "replace_rel.json")))
    rows = [{"image_0": cr[str(i)]["filename"], "image_1": cr[str(i + 1)]["filename"],
             "caption_0": cr[str(i)]["caption"], "caption_1": cr[str(i + 1)]["caption"]} for i in (0, 2, 4)]
    with open(os.path.join(out, "test", "winoground.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return out


def _tiny(world, layers, hidden, seed, vision_tower=None):
    from transformers import AutoImageProcessor, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(world, "tokenizer"))
    torch.manual_seed(seed)
    llm = dict(llm_cfg(layers=layers, hidden=hidden), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    cfg = VLMConfig(vision=vision_cfg(IMAGE_SIZE, PATCH), llm=llm, image_token_id=tok.convert_tokens_to_ids("<image>"))
    m = VLM(cfg, vision_tower=vision_tower).eval()
    m.tokenizer, m.image_processor = tok, AutoImageProcessor.from_pretrained(os.path.join(world, "image_processor"))
    return m


def test_likelihood_prefers_the_trained_caption(world):
    m = _tiny(world, layers=2, hidden=32, seed=0)
    r = ev.Runner(m, world, batch_size=4, progress=False)
    image = "images/test_00000.png"
    good, bad = "a red star above a blue triangle", "a blue star above a red triangle"
    batch = collate([r.sample(ev.CAPTION_PROMPT, image, good)], r.pad_id)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(40):
        loss = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    specs = [(ev.CAPTION_PROMPT, image, good), (ev.CAPTION_PROMPT, image, bad), (ev.CAPTION_PROMPT, image, "a star")]
    lp = r.loglik(specs, "test")
    assert lp[0] > lp[1] + 1.0 and lp[0] > lp[2]
    # each batched score is the mean log-probability of its answer tokens (+ <eos>) alone: -(LM loss)
    for spec, score in zip(specs, lp):
        b = collate([r.sample(*spec)], r.pad_id)
        with torch.no_grad():
            loss = m(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"])["loss"]
        assert score == pytest.approx(-float(loss), abs=1e-4)
    # forced choice reads the first answer position: after training, "a" (the caption's first word) wins
    (a_lp, red_lp), = r.first_token_logprobs([(ev.CAPTION_PROMPT, image, None)], ["a", "red"], "test")
    assert a_lp > red_lp and a_lp > math.log(0.5)


def test_alignment_is_one_minus_the_training_vat_loss(world):
    student = _tiny(world, layers=4, hidden=32, seed=1)
    teacher = _tiny(world, layers=6, hidden=48, seed=2, vision_tower=copy.deepcopy(student.vision_tower))
    r = ev.Runner(student, world, batch_size=8, progress=False)
    items, _ = cr.load(os.path.join(world, "test", "cr"), world, limit=1)
    specs = [(ev.CAPTION_PROMPT, it["image"], it["pos"]) for it in items]  # 7 items: one batch
    pairs = alignment.matched_layers(student, teacher, [1, 2], [2, 3, 4])
    assert pairs.student == [1, 2] and pairs.windows == [[2, 3], [3, 4]]
    got = alignment.run_align(r, teacher, pairs, specs, "test")
    (batch, _), = list(r.batches(specs, "test"))

    def training_vat(**form):
        ts = TeacherStudent(teacher, student, VATSettings([1, 2], [2, 3, 4], vat_layer_reduce="mean", **form))
        with torch.no_grad():
            return float(ts(batch, with_kd=False)["vat"])
    assert got["n"] == 7
    # image queries: the reference code's form; all queries: the paper's (the training default)
    assert got["image_queries"]["vat_cos"] == pytest.approx(1 - training_vat(vat_queries="image", vat_pool="column"),
                                                            abs=1e-5)
    assert got["all_queries"]["vat_cos"] == pytest.approx(1 - training_vat(), abs=1e-5)
    assert 0 < got["image_queries"]["flat_cos"] < 1 and 0 < got["text_queries"]["flat_cos"] < 1
    # a student that is its own teacher is perfectly aligned in every form
    same = alignment.run_align(r, copy.deepcopy(student), LayerPairs([1, 2], [1, 2], [[1], [2]]), specs, "test")
    for form in (same["image_queries"], same["text_queries"], same["all_queries"]):
        for k, v in form.items():
            if k != "per_pair":
                assert v == pytest.approx(1.0, abs=1e-5), k


def test_end_to_end_report_heatmap_and_cli(world, tmp_path, capsys):
    student = _tiny(world, layers=4, hidden=32, seed=1)
    teacher = _tiny(world, layers=6, hidden=48, seed=2, vision_tower=copy.deepcopy(student.vision_tower))
    # the matched layers come from the student's training config, as run_log.Checkpointer records it
    student.config.extra = {"stage": "dft", "train_config": {"student_layers": [1, 2], "teacher_layers": [2, 3, 4],
                                                             "matching": "group"}}
    student.save_pretrained(str(tmp_path / "student"))
    teacher.save_pretrained(str(tmp_path / "teacher"))
    out = str(tmp_path / "eval")
    tasks = ["vqa", "cr", "pope", "wino", "reefknot", "align"]
    rep = ev.evaluate(str(tmp_path / "student"), world, tasks=tasks, teacher=str(tmp_path / "teacher"), heatmaps=1,
                      out=out, batch_size=8, progress=False)
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["tasks"] == tasks and all(t in saved for t in tasks)
    assert saved["matched_layers"] == {"student": [1, 2], "teacher_windows": [[2, 3], [3, 4]]}
    assert saved["vqa"]["n"] == 10 * len(saved["vqa"]["per_type"]) and saved["wino"]["n"] == 3
    assert saved["cr"]["subsets"] == cr.CR_ORDER
    assert all(saved["cr"][p]["per_subset"][s]["n"] == 10 for p in ("mcq", "likelihood") for s in cr.CR_ORDER)
    assert {s: v["n"] for s, v in saved["pope"]["forced"]["per_split"].items()} == \
        {"adversarial": 20, "popular": 20, "random": 20}
    # the default world's mix trains the yes/no form only, so that is the one file it writes; images found by id
    assert os.listdir(os.path.join(world, "test", "reefknot")) == ["YESNO.jsonl"]
    assert saved["reefknot"]["yesno"]["n"] == 20 and saved["skipped"]["reefknot"] == 0
    assert saved["reefknot"]["mean"]["tasks"] == ["yesno"] and "multichoice" not in saved["reefknot"]
    assert set(saved["align"]) == {"vqa", "cr"} and set(saved["align"]["cr"]["image_queries"]["per_pair"]) == \
        {"student layer 1 vs teacher layers 2-3", "student layer 2 vs teacher layers 3-4"}
    assert saved["cr"]["mcq"]["unknown_words"] == []  # shapes.vocabulary() covers the MCQ prompt

    def numbers(d, path=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from numbers(v, f"{path}/{k}")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
                yield f"{path}/{k}", v

    for task in tasks:
        vals = list(numbers(saved[task]))
        assert vals, task
        for where, v in vals:
            assert 0.0 <= v <= 1.0, (task, where, v)
    # the teacher-student similarities are real numbers strictly between "unrelated" and "identical"
    assert 0 < saved["align"]["vqa"]["image_queries"]["vat_cos"] < 1

    (png,) = saved["heatmaps"]
    assert os.path.isfile(png) and png == rep["heatmaps"][0]
    with Image.open(png) as im:
        H = alignment.HEAT
        assert im.size == alignment.heatmap_size(n_pairs=2, n_rows=4) == \
            (H["label_w"] + 3 * 128, H["title_h"] + H["header_h"] + 4 * (128 + H["caption_h"]) + H["bar_h"])
    md = open(os.path.join(out, "report.md")).read()
    assert "| model | n (skipped) | VQA | CR mcq | CR lik |" in md and "heatmap_000.png" in md
    assert f"| student | vqa {saved['vqa']['n']}, cr 70, pope 60, wino 3, reefknot 20 | " in md
    assert "| split | protocol | n | accuracy |" in md and "| random | generate | 20 | " in md
    assert saved["status"] == "complete" and saved["pope"]["generate"]["reading"].startswith("POPE's evaluate.py")

    # the same checkpoint from the command line: no teacher, so align is skipped with a note
    rep2 = ev.main([f"--model={tmp_path / 'student'}", f"--data={world}", "--tasks=vqa,cr,align", "--limit=3",
                    "--cr_protocol=likelihood", "--batch_size=4"])
    printed = capsys.readouterr().out
    assert "| model | n (skipped) | VQA |" in printed
    # the default report goes beside the checkpoint, never inside it (a resumed run's next save replaces the dir)
    assert os.path.isfile(tmp_path / "student_eval" / "report.json") and not (tmp_path / "student" / "eval").exists()
    assert rep2["vqa"]["n"] == 3 and "mcq" not in rep2["cr"] and "align" not in rep2
    assert any("align skipped" in n for n in rep2["notes"])

    # several checkpoints, one table (run_shapes.sh); the teacher is not aligned with itself
    cmp_out = tmp_path / "cmp"
    reps = ev.main([f"--compare=teacher={tmp_path / 'teacher'},student={tmp_path / 'student'}",
                    f"--teacher={tmp_path / 'teacher'}", f"--data={world}", f"--out={cmp_out}", "--tasks=cr,align",
                    "--limit=2", "--cr_protocol=likelihood", "--heatmaps=1"])
    assert list(reps) == ["teacher", "student"] and "align" not in reps["teacher"] and "align" in reps["student"]
    md = open(cmp_out / "report.md").read()
    assert "| teacher | " in md and "| student | " in md
    assert os.path.isfile(cmp_out / "student" / "report.json") and \
        os.path.isfile(cmp_out / "teacher" / "heatmap_000.png")
    assert set(json.load(open(cmp_out / "report.json"))) == {"teacher", "student"}

    table = compare_table({"a": saved, "b": rep2})
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| a | ") and lines[3].startswith("| b | vqa 3, cr 21 | ")
    assert lines[0].count("|") == lines[2].count("|") == lines[3].count("|")


# -----------------------------------------------------------------------------
# skipped items, precision, files found before the run


def test_unreadable_images_are_skipped_and_counted(world, tmp_path):
    """A benchmark image that is not an image is skipped and counted like a missing one, and named in a warning; a
    test set with no readable image stops with one line; an image that only fails when decoded is one line too."""
    import shutil
    for i in range(3):
        shutil.copy(os.path.join(world, "images", f"test_0000{i}.png"), tmp_path / f"{i}.png")
    (tmp_path / "page.png").write_text("<html>404 not found</html>")
    write_huge_png(tmp_path / "huge.png")  # over PIL's pixel limit: PIL raises no OSError for it
    rows = [dict(question="what shape is red ?", answer="star", image=f) for f in
            ("0.png", "page.png", "1.png", "gone.png", "2.png", "page.png", "huge.png")]
    with open(tmp_path / "vqa.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    m = _tiny(world, layers=2, hidden=32, seed=0)
    with pytest.warns(UserWarning) as w:
        rep = ev.evaluate(m, str(tmp_path), tasks="vqa", progress=False)
    assert rep["vqa"]["n"] == 3 and rep["skipped"] == {"vqa": 4}
    md = report_markdown(rep)  # the skipped items beside the figure computed without them, in both tables
    assert "| vqa 3 (4 skipped) | " in md
    assert f"accuracy {100 * rep['vqa']['accuracy']:.1f} on 3 items (4 skipped); reading: VQAv2's" in md
    said = " ".join(str(x.message) for x in w)
    assert "skipping 3 items whose images cannot be read" in said and str(tmp_path / "page.png") in said
    assert "200000000 pixels" in common._image_problem(str(tmp_path / "huge.png"), {})
    assert "skipping 1 items whose images are missing" in said

    with open(tmp_path / "vqa.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["image"] in ("page.png", "gone.png"))
    with pytest.raises(ValueError) as e:
        ev.evaluate(m, str(tmp_path), tasks="vqa", progress=False)
    assert str(e.value).startswith(f"vqa ({tmp_path / 'vqa.jsonl'}): none of the 3 items' images can be read (") \
        and "\n" not in str(e.value)

    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(tmp_path / "cut.jpg")
    data = open(tmp_path / "cut.jpg", "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    assert common._image_problem(str(tmp_path / "cut.jpg"), {}) is None  # the check before the run does not decode
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'cut.jpg'}: cannot be read as an image \(.*[Tt]runcated"):
        ev.Runner(m, str(tmp_path), progress=False).pixels("cut.jpg")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluate_computes_in_the_dtype_the_model_was_loaded_in(world, tmp_path, dtype, device):
    """One rule for evaluate.py and sample.py: the model computes in the dtype of its loaded weights (--dtype), no
    autocast (on a GPU too, where there is one: a bf16 autocast would make --dtype=float32 compute in bf16). What the
    LM's layers see, and the scores against a plain forward of the same model."""
    _tiny(world, layers=2, hidden=32, seed=0).save_pretrained(str(tmp_path / "m"))
    m = VLM.from_pretrained(str(tmp_path / "m"), dtype=dtype).to(device).eval()
    seen = []
    m.llm.model.layers[0].register_forward_pre_hook(
        lambda mod, a, kw: seen.append((a[0] if a else kw["hidden_states"]).dtype), with_kwargs=True)
    r = ev.Runner(m, world, batch_size=4, progress=False)
    specs = [(ev.CAPTION_PROMPT, "images/test_00000.png", "a red star"), (ev.CAPTION_PROMPT, "images/test_00001.png",
                                                                        "a blue circle above a green square")]
    lp = r.loglik(specs, "test")
    r.generate([(s[0], s[1], None) for s in specs], 3, "test")
    assert seen and set(seen) == {dtype}
    for spec, score in zip(specs, lp):  # the batch's scores are the plain forward's, in the same dtype
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([r.sample(*spec)], r.pad_id).items()}
        with torch.no_grad():
            loss = m(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"])["loss"]
        assert score == pytest.approx(-float(loss), abs=1e-4 if dtype == torch.float32 else 0.1)


def test_a_missing_test_file_stops_before_any_task_runs(world, tmp_path, monkeypatch):
    import shutil
    data = tmp_path / "w"
    shutil.copytree(world, data)
    shutil.rmtree(data / "test" / "reefknot")
    ran = []
    monkeypatch.setattr(vqa, "run", lambda *a, **k: ran.append("vqa"))
    student = _tiny(world, layers=2, hidden=32, seed=1)
    with pytest.raises(FileNotFoundError, match="task reefknot: no test file"):
        ev.evaluate(student, str(data), tasks="vqa,reefknot", progress=False)
    assert ran == []


def test_reefknot_download_with_its_own_image_folder_through_evaluate(world, tmp_path):
    root, images = str(tmp_path / "reefknot"), str(tmp_path / "vg")
    write_reefknot_layout(root, images)
    student = _tiny(world, layers=2, hidden=32, seed=1)
    with pytest.warns(UserWarning, match="999.jpg"):
        rep = ev.evaluate(student, world, tasks="reefknot", reefknot_dir=root, reefknot_image_folder=images,
                          progress=False)
    assert {t: rep["reefknot"][t]["n"] for t in reefknot.REEFKNOT_FILES} == {"yesno": 2, "multichoice": 1, "vqa": 2}
    assert rep["skipped"]["reefknot"] == 1 and rep["reefknot"]["mean"]["tasks"] == list(reefknot.REEFKNOT_FILES)


# -----------------------------------------------------------------------------
# answers made elsewhere (--predictions), every item counted, errors that name the file


def _answers_world(root):
    """A benchmark folder in the official layouts (no images: --predictions needs none) and a folder of answers in
    LLaVA's answer-file format, one file per benchmark file, of the same name."""
    data, pred = root / "bench", root / "answers"
    ten = lambda a, k, other: [a] * k + [other] * (10 - k)
    write_lines(data / "vqa.jsonl", [
        dict(question_id=11, question="how many dogs?", answers=ten("2", 3, "3"), image="a.jpg"),
        dict(question_id=12, question="what colour?", answers=ten("red", 10, "x"), image="b.jpg"),
        dict(question_id=13, question="how many cats?", answers=ten("0", 4, "1"), image="c.jpg")])
    write_lines(pred / "vqa.jsonl", [dict(question_id=13, text="None"), dict(question_id=11, text="two"),
                                      dict(question_id=12, text="Red.")])  # another order: matched by question_id
    pope = [dict(question_id=i, image=f"COCO_{i}.jpg", text=f"Is there a thing {i} in the image?",
                 label="yes" if i < 4 else "no") for i in range(8)]
    write_lines(data / "coco_pope_random.json", pope)
    write_lines(pred / "coco_pope_random.json",
                 [dict(question_id=i, text="There is a dog." if i < 4 else "No.") for i in range(8)])
    write_lines(data / "reefknot" / "YESNO.jsonl", [
        dict(image_id=1, query_prompt="Is the man riding the horse?", label="yes", relation_type="cognition"),
        dict(image_id=2, query_prompt="Is the man looking at the sky?", label="no", relation_type="perception"),
        dict(image_id=3, query_prompt="Is the cup on the table?", label="no", relation_type="perception")])
    write_lines(pred / "YESNO.jsonl", [dict(text="Yes"), dict(text="No, the man's eyes are closed"),
                                        dict(text="no")])  # no question_id in Reefknot: by position
    write_lines(data / "reefknot" / "Multichoice.jsonl", [
        dict(image_id=4, query_prompt="What is the cat doing? A. eating B. onto", label="B"),
        dict(image_id=5, query_prompt="What is the man doing? A. riding B. under", label="A")])
    write_lines(pred / "Multichoice.jsonl", [dict(text="(B) onto"), dict(text="A")])
    return data, pred


def test_predictions_score_answer_files_by_the_official_readings(tmp_path):
    """Expected numbers from the official scripts' rules (VQAv2 vqaEval.py, POPE evaluate.py, Reefknot utils.py), by
    hand: VQA 3 of 10 -> 0.9, 10 of 10 -> 1, "None" = "0" 4 of 10 -> 1; POPE's eight answers are perfect; Reefknot
    YESNO 2 of 3 ("eyes" holds "yes"), Multichoice 1 of 2 ("(B)" starts with "(")."""
    data, pred = _answers_world(tmp_path)
    rep = ev.main([f"--predictions={pred}", f"--data={data}"])
    assert rep["tasks"] == ["vqa", "pope", "reefknot"] and rep["status"] == "complete"
    assert any("cr, align not scored" in n for n in rep["notes"])
    assert rep["vqa"]["n"] == 3 and rep["vqa"]["accuracy"] == pytest.approx((0.9 + 1.0 + 1.0) / 3)
    g = rep["pope"]["generate"]["per_split"]["random"]
    assert (g["n"], g["accuracy"], g["f1"], g["yes_ratio"], g["invalid"]) == (8, 1.0, 1.0, 0.5, 0.5)
    assert "forced" not in rep["pope"]  # a model-only protocol
    assert rep["reefknot"]["yesno"]["accuracy"] == pytest.approx(2 / 3) and rep["reefknot"]["yesno"]["n"] == 3
    assert rep["reefknot"]["multichoice"]["accuracy"] == 0.5
    assert rep["skipped"] == {"vqa": 0, "pope": 0, "reefknot": 0}
    saved = json.load(open(f"{pred}_eval/report.json"))
    assert saved["vqa"]["accuracy"] == rep["vqa"]["accuracy"] and saved["predictions"] == str(pred)
    assert "| answers | vqa 3, pope 8, reefknot 5 | 96.7 |" in open(f"{pred}_eval/report.md").read()


def test_predictions_that_do_not_match_stop_with_one_line_naming_the_file(tmp_path):
    data, pred = _answers_world(tmp_path)
    write_lines(pred / "YESNO.jsonl", [dict(text="Yes"), dict(text="no")])
    with pytest.raises(ValueError, match=rf"^{pred / 'YESNO.jsonl'}: 2 answers for the 3 items of "):
        ev.main([f"--predictions={pred}", f"--data={data}", "--tasks=reefknot"])
    write_lines(pred / "vqa.jsonl", [dict(question_id=13, text="0"), dict(question_id=11, text="2"),
                                      dict(question_id=99, text="red")])
    with pytest.raises(ValueError, match=rf"^{pred / 'vqa.jsonl'}: question_id '99' is not a question of "
                                         r".*vqa.jsonl \(1 unknown, 1 unanswered\)"):
        ev.main([f"--predictions={pred}", f"--data={data}", "--tasks=vqa"])
    write_lines(pred / "vqa.jsonl", [dict(question_id=11, text="2"), dict(question_id=12, answer="red"),
                                      dict(question_id=13, response="0")])
    with pytest.raises(ValueError, match=rf"^{pred / 'vqa.jsonl'}: line 3 has no \"text\""):
        ev.main([f"--predictions={pred}", f"--data={data}", "--tasks=vqa"])
    os.remove(pred / "coco_pope_random.json")
    with pytest.raises(FileNotFoundError, match=rf"^{pred / 'coco_pope_random.json'}: no answer file"):
        ev.main([f"--predictions={pred}", f"--data={data}", "--tasks=pope"])


def test_compare_checks_every_model_before_the_first_runs(world, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: ran.append(a))
    _tiny(world, layers=2, hidden=32, seed=0).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'typo'}: no such directory"):
        ev.main([f"--compare=a={tmp_path / 'a'},b={tmp_path / 'typo'}", f"--data={world}", f"--out={tmp_path / 'o'}"])
    with pytest.raises(ValueError, match="the name 'm' is given twice"):
        ev.main([f"--compare=m={tmp_path / 'a'},m={tmp_path / 'a'}", f"--data={world}", f"--out={tmp_path / 'o'}"])
    assert ran == []


def test_an_interrupted_evaluation_keeps_the_finished_tasks_and_says_so(world, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    os.makedirs(out)
    (out / "report.json").write_text(json.dumps({"model": "an older run", "vqa": {"accuracy": 0.99}}))

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pope, "run", interrupted)
    m = _tiny(world, layers=2, hidden=32, seed=0)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(m, world, tasks="cr,pope,wino", cr_protocol="likelihood", limit=1, out=str(out), progress=False)
    saved = json.load(open(out / "report.json"))
    assert saved["status"] == "interrupted" and "cr" in saved and "pope" not in saved and "vqa" not in saved
    assert saved["cr"]["likelihood"]["per_subset"]["swap_obj"]["n"] == 1
    assert "**Status: interrupted** (finished: cr; not finished: pope, wino)" in open(out / "report.md").read()


def test_the_default_report_survives_a_resumed_run_saving_over_the_checkpoint(world, tmp_path):
    """evaluate.py's default --out is beside the checkpoint (<model>_eval): a run stopped early, evaluated, then
    resumed replaces its checkpoint directory at the next save, and the report stays."""
    from conftest import run
    _tiny(world, layers=2, hidden=32, seed=0).save_pretrained(str(tmp_path / "init"))
    stage = dict(init_from=str(tmp_path / "init"), data=os.path.join(world, "instruct.json"),
                 out_dir=str(tmp_path / "run"), max_steps=2, save_interval=1)
    run("sft", **stage, stop_after=1)
    ev.main([f"--model={tmp_path / 'run'}", f"--data={world}", "--tasks=vqa", "--limit=1"])
    report = (tmp_path / "run_eval" / "report.json").read_text()
    run("sft", **stage)  # resumes, saves step 2 over the checkpoint directory
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)["step"] == 2
    assert (tmp_path / "run_eval" / "report.json").read_text() == report


def test_an_interrupted_comparison_keeps_the_finished_models_and_says_so(world, tmp_path, monkeypatch):
    _tiny(world, layers=2, hidden=32, seed=0).save_pretrained(str(tmp_path / "a"))
    _tiny(world, layers=2, hidden=32, seed=1).save_pretrained(str(tmp_path / "b"))
    out = tmp_path / "cmp"
    os.makedirs(out)
    (out / "report.md").write_text("an older table")
    done = dict(model="a", teacher=None, data=world, limit=None, device="cpu", tasks=["vqa"], skipped={"vqa": 1},
                vqa=dict(n=5, accuracy=0.4, per_type={}, reading="r"))

    def fake(model, *a, name=None, **k):
        if name.endswith("b"):
            raise KeyboardInterrupt
        return done
    monkeypatch.setattr(ev, "evaluate", fake)
    with pytest.raises(KeyboardInterrupt):
        ev.main([f"--compare=a={tmp_path / 'a'},b={tmp_path / 'b'}", f"--data={world}", f"--out={out}"])
    md = open(out / "report.md").read()
    assert "**Status: interrupted** (1 of 2 models)" in md and "| a | vqa 5 (1 skipped) | 40.0 |" in md
    assert list(json.load(open(out / "report.json"))) == ["a"]
