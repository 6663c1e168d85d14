"""
    OMP_NUM_THREADS=1 python -m pytest -q tests/test_shapes.py

The shapes world (shapes.py): determinism and the default world's digest, truth of every positive, the exact shape of
every CR negative, balanced POPE, held-out combos, a tokenizer without <unk>, the hard world's own rules, and the paths
run_shapes.sh writes. The vision tower's labels and pretraining: tests/test_shapes_tower.py.
"""
import hashlib
import json
import os
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import shapes  # noqa: E402


def _hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# Every test that takes `world` runs on every world preset: each must keep the default one's rules and pitfalls.
@pytest.fixture(scope="module", params=["default", "hard"])
def world(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes") / "w")
    meta = shapes.generate(out, seed=0, n_train=40, n_test=20, progress=False, **shapes.WORLDS[request.param])
    scenes = json.load(open(os.path.join(out, "scenes.json")))
    return out, meta, scenes


def _cr(out, subset):
    return json.load(open(os.path.join(out, "test", "cr", f"{subset}.json")))


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def _rules(meta):
    """The WORLDS entry a generated world's meta.json describes."""
    rules = meta.get("world")
    if rules is None:
        return shapes.WORLDS["default"]
    return next(w for w in shapes.WORLDS.values() if w.get("grid") == meta["grid"] and
                w.get("tower_labels", "cell") == rules["tower_labels"])


def test_determinism(world, tmp_path):
    out, meta, _ = world
    same = str(tmp_path / "same")
    shapes.generate(same, seed=0, n_train=40, n_test=20, progress=False, **_rules(meta))
    h0, h1 = _hashes(out), _hashes(same)
    n_reefknot = len(os.listdir(os.path.join(out, "test", "reefknot")))
    assert len(h0) == 40 + 20 + 15 + 3 + n_reefknot and h0 == h1  # images, json(l), Reefknot, tokenizer + processor
    other = str(tmp_path / "other")
    shapes.generate(other, seed=1, n_train=40, n_test=20, progress=False, **_rules(meta))
    h2 = _hashes(other)
    assert h2.keys() == h0.keys()
    differ = [k for k in h0 if h0[k] != h2[k]]
    assert "pretrain.json" in differ and "images/train_00000.png" in differ and "test/cr/swap_att.json" in differ


def test_files_and_counts(world):
    out, meta, scenes = world
    pre = json.load(open(os.path.join(out, "pretrain.json")))
    ins = json.load(open(os.path.join(out, "instruct.json")))
    assert len(pre) == 40 and len(ins) == 41 and meta["counts"]["instruct_text_only"] == 1
    assert sum("image" not in s for s in ins) == 1
    for s in pre:
        assert s["conversations"][0]["value"] == "<image>\n" + shapes.PROMPT
        assert shapes.caption_true(s["conversations"][1]["value"], scenes[s["image"]]["objects"])
        assert os.path.isfile(os.path.join(out, s["image"]))
    for s in ins:
        turns = s["conversations"]
        most = len(shapes.MIX["turns"])
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 2 <= len(turns) <= 2 * most
        assert turns[0]["value"].startswith("<image>\n") == ("image" in s)
    vqa = _jsonl(os.path.join(out, "test", "vqa.jsonl"))
    kinds = [k for k in shapes.MIX["weights"] if k != "position" or shapes.position_words(meta["grid"])]
    assert [r["type"] for r in vqa] == kinds * 20  # every kind the mix asks, once per test image
    assert all((r.get("answer_type") == "yes/no") == (r["type"] in shapes.YES_NO_KINDS) for r in vqa)
    assert all(len(_cr(out, s)) == 20 for s in shapes.CR_SUBSETS)


def test_default_world_unchanged(tmp_path):
    """The default world's images (decoded pixels, so a Pillow that compresses PNGs otherwise changes nothing) and
    text files (not the tokenizer's and image processor's, which the transformers version formats) are exactly those
    this hash was taken from. A change of the world changes the hash: take it again (the test prints it) and say why
    in the commit."""
    import numpy as np
    from PIL import Image
    out = str(tmp_path / "w")
    shapes.generate(out, seed=0, n_train=40, n_test=20, progress=False)
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(out)):
        for f in sorted(files):
            path = os.path.join(root, f)
            rel = os.path.relpath(path, out)
            if rel.startswith(("tokenizer", "image_processor")):
                continue
            h.update(rel.encode())
            if f.endswith(".png"):
                with Image.open(path) as im:
                    h.update(f"{im.mode} {im.size}".encode() + np.asarray(im).tobytes())
            else:
                h.update(open(path, "rb").read())
    print("default world hash:", h.hexdigest())
    assert h.hexdigest() == "d36046763339c1fcfd1998ee410704b86510aa6a49b479014fc83172189ee80f"


def test_scenes_obey_rules(world):
    _, meta, scenes = world
    lo, hi = meta.get("world", {}).get("n_objects", (2, 4))
    for sc in scenes.values():
        objs = sc["objects"]
        assert lo <= len(objs) <= hi
        for key in ("color", "shape"):
            assert len({o[key] for o in objs}) == len(objs)
        assert len({(o["row"], o["col"]) for o in objs}) == len(objs)


def test_held_out_combos(world):
    _, meta, scenes = world
    held = {tuple(h) for h in meta["held_out"]}
    combos = lambda split: {(o["color"], o["shape"]) for s in scenes.values() if s["split"] == split
                            for o in s["objects"]}
    assert not combos("train") & held
    assert combos("test") >= held  # all four appear among 20 test images


def test_cr_positives_true_negatives_false_and_lawful(world):
    out, _, scenes = world
    for subset in shapes.CR_SUBSETS:
        for item in _cr(out, subset).values():
            objs = scenes[item["filename"]]["objects"]
            assert shapes.caption_true(item["caption"], objs), (subset, item)
            assert not shapes.caption_true(item["negative_caption"], objs), (subset, item)
            assert shapes.obeys_rules(item["caption"]) and shapes.obeys_rules(item["negative_caption"]), (subset, item)


def test_cr_negatives_differ_exactly_as_named(world):
    out, _, scenes = world

    def diff(item):
        p, n = item["caption"].split(), item["negative_caption"].split()
        return p, n, [i for i in range(min(len(p), len(n))) if p[i] != n[i]]

    for item in _cr(out, "swap_att").values():
        p, n, d = diff(item)
        assert len(p) == len(n) and len(d) == 2 and all(p[i] in shapes.COLORS for i in d)
        assert (p[d[0]], p[d[1]]) == (n[d[1]], n[d[0]])
    for item in _cr(out, "swap_obj").values():
        p, n, d = diff(item)
        assert len(p) == len(n) and len(d) == 2 and all(p[i] in shapes.SHAPES for i in d)
        assert (p[d[0]], p[d[1]]) == (n[d[1]], n[d[0]])
    for item in _cr(out, "replace_rel").values():
        p, n, d = diff(item)
        assert len(p) == len(n) and len(d) == 1 and shapes.RELATIONS[p[d[0]]] == n[d[0]]
    for subset, vocab, attr in (("replace_att", shapes.COLORS, "color"), ("replace_obj", shapes.SHAPES, "shape")):
        for item in _cr(out, subset).values():
            p, n, d = diff(item)
            here = {o[attr] for o in scenes[item["filename"]]["objects"]}
            assert len(p) == len(n) and len(d) == 1 and p[d[0]] in vocab and n[d[0]] in vocab and n[d[0]] not in here
    for item in _cr(out, "add_obj").values():  # length-matched: only the last object changes, to an absent one
        p, n, d = diff(item)
        assert len(p) == len(n) and d and min(d) > max(i for i, w in enumerate(p) if w in (",", "and"))
        new = shapes.parse_caption(item["negative_caption"])[0][-1]
        assert all((o["color"], o["shape"]) != (new["color"], new["shape"])
                   for o in scenes[item["filename"]]["objects"])
    for item in _cr(out, "add_att").values():  # one extra colour or size word, nothing else changes
        p, n, _ = diff(item)
        assert len(n) == len(p) + 1
        k = next(i for i in range(len(n)) if i == len(p) or p[i] != n[i])
        assert n[:k] + n[k + 1:] == p and (n[k] in shapes.COLORS or n[k] in shapes.SIZES)


def test_pope_balanced_and_true(world):
    out, _, scenes = world
    for split in shapes.POPE_SPLITS:
        rows = _jsonl(os.path.join(out, "test", f"pope_{split}.jsonl"))
        assert len(rows) == 40 and sum(r["answer"] == "yes" for r in rows) == 20
        for r in rows:
            assert r["category"] == split and r["question"] == f"is there a {r['object']} in the image ?"
            present = {f"{o['color']} {o['shape']}" for o in scenes[r["image"]]["objects"]}
            assert (r["object"] in present) == (r["answer"] == "yes")
            if split == "adversarial" and r["answer"] == "no":  # binding foil: colour and shape both present
                c, s = r["object"].split()
                assert c in {p.split()[0] for p in present} and s in {p.split()[1] for p in present}


def _oracle(q, objs):
    """An answerer written independently of shapes.question, from the question templates alone."""
    w = q.split()
    name = lambda o: f"{o['color']} {o['shape']}"
    find = lambda np: [o for o in objs if all(x in (o["color"], o["shape"], o["size"]) for x in np.split())]
    rows, cols = shapes.position_words(3)
    if q.startswith("what color is the "):
        return find(w[4])[0]["color"]
    if q.startswith("what shape is "):
        return find(w[3])[0]["shape"]
    if q.startswith("what size is the "):
        return find(" ".join(w[4:6]))[0]["size"]
    if q.startswith("is there a "):
        np = " ".join(w[3:w.index("in")]).replace(" object", "")
        return "yes" if find(np) else "no"
    if q.startswith("how many "):
        return shapes.NUMBERS[len(objs) if w[2] == "objects" else sum(o["size"] == w[2] for o in objs)]
    if q.startswith("is the "):  # "is the A REL the B ?" is true iff the caption "a A REL a B" is
        return "yes" if shapes.caption_true("a " + q[len("is the "):-2].replace(" the ", " a "), objs) else "no"
    if q.startswith("where is the "):
        o = find(" ".join(w[3:-1]))[0]
        return f"{rows[o['row']]} {cols[o['col']]}"
    if q.startswith("what is in the "):
        here = [o for o in objs if (rows[o["row"]], cols[o["col"]]) == (w[4], w[5])]
        return name(here[0]) if here else "nothing"
    if q.startswith("what is "):  # "what is REL the B ?": the one object on that side of B
        rel, ref = w[2], find(" ".join(w[w.index("the") + 1:-1]))[0]
        side = [o for o in objs if rel in shapes.relation(o, ref)]
        assert len(side) == 1, q
        return name(side[0])
    raise AssertionError(f"unknown question template: {q}")


def test_every_image_answer_is_right(world):
    out, _, scenes = world
    qa = [(r["question"], r["answer"], r["image"]) for r in _jsonl(os.path.join(out, "test", "vqa.jsonl"))]
    for s in json.load(open(os.path.join(out, "instruct.json"))):
        if "image" in s:
            t = s["conversations"]
            qa += [(t[i]["value"].replace("<image>\n", ""), t[i + 1]["value"], s["image"]) for i in range(0, len(t), 2)]
    for q, a, image in qa:
        assert _oracle(q, scenes[image]["objects"]) == a, (q, a, image)


def test_reefknot_items_are_true_to_their_scene(world):
    """Reefknot's layout, in the format the world's mix trains (YESNO), in pairs on one object pair (the true
    relation, then its opposite); every label what an independent answerer says."""
    out, meta, scenes = world
    files = sorted(os.listdir(os.path.join(out, "test", "reefknot")))
    assert files == ["YESNO.jsonl"]
    rows = {f[:-6]: _jsonl(os.path.join(out, "test", "reefknot", f)) for f in files}
    assert len(rows["YESNO"]) == 40
    for k, items in rows.items():
        for r in items:
            assert set(r) == {"image_id", "query_prompt", "label", "relation_type"} and \
                r["relation_type"] == "perception"
            objs = scenes[f"images/{r['image_id']}.png"]["objects"]
            assert _oracle(r["query_prompt"], objs) == r["label"].lower(), r
    yn = rows["YESNO"]
    for pos, neg in zip(yn[::2], yn[1::2]):
        assert (pos["label"], neg["label"], pos["image_id"]) == ("yes", "no", neg["image_id"])
        p, n = pos["query_prompt"].split(), neg["query_prompt"].split()
        assert [w for w in p if w not in shapes.RELATIONS] == [w for w in n if w not in shapes.RELATIONS]


def test_yes_no_balanced():
    import random
    rng = random.Random(0)
    for kind in ("exist", "rel_yn"):
        answers = [shapes.question(rng, shapes.sample_scene(rng, 3, 64), 3, kind)[1] for _ in range(2000)]
        assert set(answers) == {"yes", "no"} and 0.45 < answers.count("yes") / len(answers) < 0.55


def test_tokenizer_covers_every_text(world):
    out, meta, _ = world
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert len(tok) == meta["vocab_size"]
    texts = []
    for f in ("pretrain.json", "instruct.json"):
        texts += [t["value"] for s in json.load(open(os.path.join(out, f))) for t in s["conversations"]]
    for subset in shapes.CR_SUBSETS:
        texts += [v[k] for v in _cr(out, subset).values() for k in ("caption", "negative_caption")]
    for f in ["vqa.jsonl"] + [f"pope_{s}.jsonl" for s in shapes.POPE_SPLITS]:
        texts += [r["question"] + " " + r["answer"] for r in _jsonl(os.path.join(out, "test", f))]
    ids = tok(texts, add_special_tokens=False).input_ids
    assert all(tok.unk_token_id not in x for x in ids)
    assert sum(x.count(tok.convert_tokens_to_ids("<image>")) for x in ids) == 40 + 40  # one per image sample


def test_project_loader_reads_it(world):
    """data.py's LLaVA loader serves the files as written: images found, answers supervised, no <unk>."""
    from transformers import AutoTokenizer
    import data
    out, meta, _ = world
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    proc = data.image_processor(meta["image_size"])
    for f in ("pretrain.json", "instruct.json"):
        ds = data.LLaVADataset(os.path.join(out, f), None, tok, proc, num_image_tokens=4, max_length=256)
        batch = data.collate([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)
        assert not ds.dropped and batch["pixel_values"].shape == (40, 3, 48, 48)
        assert int(batch["image_mask"].sum()) == 40 and not (batch["input_ids"] == tok.unk_token_id).any()


# ----------------------------------------------------------------------------- the hard world's own rules
@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes_hard") / "w")
    meta = shapes.generate(out, seed=0, n_train=60, n_test=20, progress=False, **shapes.WORLDS["hard"])
    return out, meta, json.load(open(os.path.join(out, "scenes.json")))


def test_hard_world_meta_and_counts(hard):
    _, meta, scenes = hard
    assert meta["grid"] == 4 and meta["world"]["tower_labels"] == "blocks+shape" and meta["world"]["patch_size"] == 8
    assert not {"top", "middle", "bottom", "center"} & set(meta["vocab"])  # no position words on a 4x4 grid
    counts = Counter(len(s["objects"]) for s in scenes.values())
    assert set(counts) == {3, 4, 5}
    assert all(1 <= len(s["clutter"]) <= 3 for s in scenes.values())


def test_hard_questions_never_ask_for_a_position(hard):
    out, _, _ = hard
    qs = [t["value"] for s in json.load(open(os.path.join(out, "instruct.json"))) for t in s["conversations"][::2]]
    assert len(qs) > 60 and not [q for q in qs if "where is" in q or "what is in the" in q]


def test_hard_clutter_sits_alone_in_empty_cells(hard):
    _, meta, scenes = hard
    cell = meta["image_size"] / meta["grid"]
    for sc in scenes.values():
        used = {(o["row"], o["col"]) for o in sc["objects"]}
        cells = [(int(c["y"] // cell), int(c["x"] // cell)) for c in sc["clutter"]]
        assert len(set(cells)) == len(cells) and not set(cells) & used
        for c in sc["clutter"]:  # the whole speck inside its cell
            for v in (c["x"], c["y"]):
                assert (v - c["r"]) // cell == (v + c["r"]) // cell == v // cell


def test_hard_objects_span_several_patches(hard):
    """Counted on the rendered label map at 1 px: a large object has >= 4 px in at least 3 patches, every object
    has pixels in at least 2; on average an object spreads over more than 3 visual tokens."""
    _, meta, scenes = hard
    n, p = meta["image_size"] // 8, 8
    spans = []
    for sc in scenes.values():
        m = shapes.label_map(sc["objects"], meta["image_size"], 1, sc["clutter"])
        for o in sc["objects"]:
            per = (m == 1 + list(shapes.COLORS).index(o["color"])).reshape(n, p, n, p).sum((1, 3))
            assert (per >= 1).sum() >= 2, o
            if o["size"] == "large":
                assert (per >= 4).sum() >= 3, o
            spans.append(int((per >= 1).sum()))
    assert sum(spans) / len(spans) > 3


def test_a_world_written_over_another_keeps_none_of_its_files(tmp_path):
    """A smaller world, and Reefknot files in formats this world does not write (an older world's), in the same
    folder: none of them stays, to be scored against these images."""
    out = str(tmp_path / "w")
    shapes.generate(out, n_train=10, n_test=6, progress=False)
    for name in ("Multichoice", "VQA"):
        with open(os.path.join(out, "test", "reefknot", f"{name}.jsonl"), "w") as f:
            f.write(json.dumps(dict(image_id="test_00000", query_prompt="?", label="A")) + "\n")
    shapes.generate(out, n_train=8, n_test=4, progress=False)
    assert os.listdir(os.path.join(out, "test", "reefknot")) == ["YESNO.jsonl"]
    assert len(os.listdir(os.path.join(out, "images"))) == 8 + 4


def _run_shapes_calls(tmp_path, extra, env=None):
    """The commands run_shapes.sh runs with `extra` arguments, each as (script, the settings it resolves): the script
    runs from a copy in tmp_path with a stand-in python that only records its arguments."""
    import subprocess
    import importlib
    from run import configure_stage
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tmp_path / "repo"
    work.mkdir(parents=True)
    (work / "run_shapes.sh").write_text(open(os.path.join(root, "run_shapes.sh")).read())
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + "
                    "'\\n')\n")
    stub.chmod(0o755)
    r = subprocess.run(["bash", str(work / "run_shapes.sh"), *extra], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=str(stub), **(env or {})))
    assert r.returncode == 0, r.stderr
    calls = []
    for argv in map(json.loads, open(log)):
        script, rest = argv[0], argv[1:]
        if script.startswith("train_"):
            stage = script.removeprefix("train_").removesuffix(".py")
            files = [os.path.join(root, a) if a.startswith("config/") else a for a in rest]
            mod = importlib.import_module(f"train_{stage}")
            calls.append((script, configure_stage(mod.DEFAULTS, files, "", mod.__file__)))
        elif script == "evaluate.py":
            calls.append((script, dict(a[2:].split("=", 1) for a in rest)))
    return calls


@pytest.mark.slow
def test_run_shapes_smoke_test_writes_where_it_blocks_nothing(tmp_path):
    """bash run_shapes.sh --max_steps=50 (its own smoke-test line) wrote seven checkpoints into out/shapes, which the
    real run then refused to resume ("other settings"). Extra arguments now get a root of their own; without them,
    every stage resolves exactly the paths of config/shapes_*.py (so existing runs there stay the same runs)."""
    default = _run_shapes_calls(tmp_path / "a", [])
    smoke = _run_shapes_calls(tmp_path / "b", ["--max_steps=50"])
    named = _run_shapes_calls(tmp_path / "c", ["--max_steps=50"], env=dict(OUT="out/mine"))
    outs = ["teacher_pt", "teacher", "dpt", "dft", "sft", "base_dpt", "base_dft", "base_sft"]
    assert [cfg["out_dir"] for _, cfg in default[:-1]] == [f"out/shapes/{d}" for d in outs]
    assert [(cfg["init_from"], cfg["teacher"]) for _, cfg in default[:-1]] == [("scratch", ""),
        ("out/shapes/teacher_pt", ""),
        ("scratch", "out/shapes/teacher"), ("out/shapes/dpt", "out/shapes/teacher"), ("out/shapes/dft", ""),
        ("scratch", "out/shapes/teacher"), ("out/shapes/base_dpt", "out/shapes/teacher"), ("out/shapes/base_dft", "")]
    for calls, root in ((smoke, "out/shapes_max_steps_50"), (named, "out/mine")):
        assert [cfg["out_dir"] for _, cfg in calls[:-1]] == [f"{root}/{d}" for d in outs]
        assert all(cfg["max_steps"] == 50 for _, cfg in calls[:-1])
        assert [cfg["init_from"] for _, cfg in calls[:-1]] == ["scratch", f"{root}/teacher_pt", "scratch",
                                                               f"{root}/dpt", f"{root}/dft", "scratch",
                                                               f"{root}/base_dpt", f"{root}/base_dft"]
        assert all(cfg["teacher"] in ("", f"{root}/teacher") for _, cfg in calls[:-1])
        assert calls[-1] == ("evaluate.py", {
            "compare": f"teacher={root}/teacher,sft_only={root}/base_sft,compodistill={root}/sft",
            "teacher": f"{root}/teacher", "out": f"{root}/eval", "heatmaps": "4", "batch_size": "64"})
    assert default[-1][1]["out"] == "out/shapes/eval"
