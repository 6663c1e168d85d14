"""
Speed and memory of one DFT step (teacher forward; student forward + backward; LM + KD + VAT losses)
on random weights built from configs (no downloads), four ways:
  ours       the training path as training runs it by default: model.TeacherStudent(...)(batch) with the paper's
             form of VAT (run.DEFAULTS: vat_queries=all vat_pool=flat, every query row), TAF applied.
  novat      the same with with_vat=False (LM + KD): what VAT costs on top. Target: ours <= 1.10x novat.
  ours_ref   the training path with the reference code's form of VAT (vat_queries=image vat_pool=column: image
             queries, column-pooled, outliers filtered), what `reference` computes.
  reference  the reference code's way, written out only here: eager attention with output_attentions=True
             in every layer of both LMs, all maps stacked, the image block sliced at each sample's image
             positions, heads averaged, teacher windows averaged, the same attention_distill.vat_loss;
             LM and KD losses on full (B, T, V) logits and softmaxes (masked after); each model runs its
             own vision tower + connector.
The pairs compared: ours/novat (the default's cost), ours_ref/reference (our approach against the reference code's,
on the same loss), ours_ref/novat.
First each VAT form that is timed is checked: our training path and the output_attentions way above, computing the
same form (the paper's form too, all rows sliced from the eager maps), run on the same batch and weights (attention
sharpened, see build), and each loss (lm, kd, vat) must agree in check_dtype=float32 to 1e-5 relative on CPU
(0 seen with one thread; ~1e-6 seen earlier with torch's default threads) or 1e-4 on CUDA.
On GPU that check runs before the cast to bf16 (~60 GB at the qwen15 shapes; if it does not fit, use
--check_dtype=bfloat16 --check_rtol=3e-2), then a bf16 check is reported for information (rtol 3e-2).
The modes then alternate step by step (fair on a noisy machine): `warmup` steps, then the median of `steps`; each
ratio is also given as the median of the per-step ratios (step i of both modes ran back to back). On CPU the
process's own CPU time (time.process_time) is reported too: with other jobs on the cores the wall time also counts
the time the process waited for a core, its CPU time does not (it still feels shared caches).
On a busy CPU, --threads=1 is steadier: 2 OpenMP threads sharing 2 cores with other jobs wait at every op.

  CPU:  python bench.py --preset=tiny --steps=20 --threads=1 [--json_out=out/bench.json]   (docs/speed.md)
  GPU:  python bench.py --preset=qwen15-1.8b-4b --steps=10 --json_out=out/bench_h100.json
  also: --modes=ours,novat  --optimizer=True (time an AdamW step too)  --compile=True (torch.compile the
        student's LM body)  --grad_ckpt=True (gradient checkpointing in the student's LM)

Memory (MiB). GPU: peak = torch.cuda.max_memory_allocated in a timed step (weights included), step = peak
minus what was allocated when the step began. CPU: one extra untimed step per mode after
malloc_trim(0) and a VmHWM reset (/proc/self/clear_refs); peak = VmHWM (peak RSS of the process), step =
VmHWM minus VmRSS when the step began (without /proc or glibc: not reported). saved = bytes autograd keeps
for backward (unique non-parameter storages, counted with saved_tensors_hooks in that extra step; not with
--compile): the activation memory, free of allocator noise, on any device.
MFU (GPU) = F / step time / bf16 dense peak (H100 SXM, H200: 989 TFLOP/s; or --peak_tflops), with model
FLOPs F the same for every mode: F = F_vis + F_lm(teacher) + 3 * F_lm(student), where
  F_lm = 2*N*B*T + 4*L*d*T*B*T + 2*V*d*n_sup   (N: LM params less embeddings and LM head; 4*L*d*T per
         token: QK^T and AV uncausally counted, as in PaLM / nanoGPT; the LM head only at the n_sup
         positions that predict a supervised token, all the objective needs)
  F_vis = B * (2*N_vis*N_v + 4*L_vis*d_vis*N_v^2)  (the frozen tower, once).
"""
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attention_distill as ad
from common import cast_weights, pick_device, resolve_dtype
from configurator import cli, configure
from data import IGNORE_INDEX
from model import VLM, TeacherStudent, VLMConfig
from run import DEFAULTS as TRAINING_DEFAULTS
from run_models import enable_checkpointing, set_trainable

DEFAULTS = dict(
    preset="tiny",                 # tiny (CPU, well under a second a step) | qwen15-1.8b-4b (GPU)
    modes="ours,novat,ours_ref,reference",  # which ways to time (module docstring), comma-separated
    steps=10,                      # timed steps per mode (median reported)
    warmup=2,                      # untimed steps per mode first
    device="auto",                 # cuda if available, else cpu
    dtype="auto",                  # bfloat16 on cuda, float32 on cpu
    threads=0,                     # CPU threads (torch.set_num_threads); 0: torch's default
    check_dtype="float32",         # dtype of the ours-vs-reference check ("" skips it)
    check_rtol=0.0,                # allowed relative difference per loss; 0: 1e-5 on CPU, 1e-4 on CUDA
    optimizer=False,               # also time an AdamW step
    compile=False,                 # torch.compile the student's LM body
    grad_ckpt=False,               # gradient checkpointing in the student's LM
    peak_tflops=0.0,               # the card's bf16 dense peak; 0: from its name
    json_out="",                   # also write the results to this JSON file
)

PAPER_FORM = ad.VATSettings.from_config(TRAINING_DEFAULTS)  # training's default: vat_queries=all vat_pool=flat
REFERENCE_FORM = dataclasses.replace(PAPER_FORM, vat_queries="image", vat_pool="column")  # the reference code's
MODES = {"ours": PAPER_FORM, "novat": None, "ours_ref": REFERENCE_FORM, "reference": REFERENCE_FORM}  # VAT settings
RATIOS = [("ours", "novat"), ("ours_ref", "reference"), ("ours_ref", "novat")]
VISION = dict(model_type="siglip_vision_model", num_channels=3)
PRESETS = {
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8),
                 student=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2),
                 teacher=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=8,
                              num_key_value_heads=4),
                 vocab=4096, batch=4, prefix=16, text=48),
    "qwen15-1.8b-4b": dict(  # SigLIP-so400m/14 at 384 px; Qwen1.5-1.8B student; Qwen1.5-4B teacher
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        student=dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                     num_key_value_heads=16),
        teacher=dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=40, num_attention_heads=20,
                     num_key_value_heads=20),
        vocab=151936, batch=4, prefix=31, text=200),
}
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12)]
MIB = 2 ** 20
BF16_RTOL = 3e-2  # the informational bf16 check: rounded maps shift the VAT outlier filter (~1e-2 seen)


def build(p, dev):
    """Teacher and student sharing one vision tower, TAF applied, the student set up for DFT."""
    lm = lambda kw: dict(model_type="qwen2", vocab_size=p["vocab"], tie_word_embeddings=False, **kw)  # noqa: E731
    img_id = p["vocab"] - 1
    with torch.device(dev):
        torch.manual_seed(0)
        teacher = VLM(VLMConfig(vision=dict(VISION, **p["vision"]), llm=lm(p["teacher"]), image_token_id=img_id))
        torch.manual_seed(1)
        student = VLM(VLMConfig(vision=dict(VISION, **p["vision"]), llm=lm(p["student"]), image_token_id=img_id),
                      vision_tower=teacher.vision_tower)
        ts = TeacherStudent(teacher, student, PAPER_FORM).apply_taf().to(dev)  # ts.vat_settings: set per mode (losses)
    # Random init attends almost uniformly (VAT ~ 0, a vacuous check): give q/k a std of 1.5/sqrt(d),
    # so attention logits have a std of ~2 as in trained models. Speed does not depend on the values.
    with torch.no_grad():
        for m in (teacher.llm, student.llm):
            for a in ad.attention_modules(m).values():
                for proj in (a.q_proj, a.k_proj):
                    proj.weight.normal_(0, 1.5 / math.sqrt(proj.in_features))
    set_trainable(student, train_llm=True)  # as in DFT
    student.train()
    student.vision_tower.eval()  # shared with the frozen teacher
    return ts


def cast(ts, dtype):
    """Both models' weights to `dtype` (rotary frequencies stay float32, as in training)."""
    for m in (ts.student, ts.teacher):
        cast_weights(m, dtype)
    return ts


def make_batch(p, nv, dev):
    """Sample b: (prefix - 2b) text tokens, the image, text to seq_len; the text after the image is supervised."""
    g = torch.Generator().manual_seed(0)
    B, T = p["batch"], p["prefix"] + nv + p["text"]
    ids = torch.randint(3, p["vocab"] - 1, (B, T), generator=g)
    labels = ids.clone()
    for b in range(B):
        start = p["prefix"] - 2 * b
        ids[b, start:start + nv] = p["vocab"] - 1
        labels[b, :start + nv] = IGNORE_INDEX
    px = torch.randn(B, 3, p["vision"]["image_size"], p["vision"]["image_size"], generator=g)
    return {k: v.to(dev) for k, v in dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                                          pixel_values=px).items()}


def reference_losses(ts, batch):
    """The reference code's way (module docstring), for the VAT form ts.vat_settings; both LMs on eager attention."""
    s, t = ts.student, ts.teacher
    ids, mask, labels, px = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"]
    is_img, has_img = s.image_positions(ids)
    nv = s.num_image_tokens
    rows, cols, row_mask = ad.vat_positions(is_img, mask, ts.vat_settings.vat_queries, nv)  # (B, Nq), (B, Nv), (B, Nq)
    nq = rows.shape[1]

    def forward(m):
        return m.llm(inputs_embeds=m.embed(ids, m.image_embeds(px)), attention_mask=mask,
                     output_attentions=True)

    def image_block(attentions):  # L x (B, H, T, T) -> (L, B, Nq, Nv), heads averaged
        A = torch.stack(attentions)
        L, B, H, T, _ = A.shape
        A = A.gather(3, rows[None, :, None, :, None].expand(L, B, H, nq, T))
        return A.gather(4, cols[None, :, None, None, :].expand(L, B, H, nq, nv)).mean(2)

    with torch.no_grad():
        out_t = forward(t)
        A_t, logits_t = image_block(out_t.attentions), out_t.logits
        del out_t
    out_s = forward(s)
    A_s = image_block(out_s.attentions)[ts.pairs.student]
    A_t = ad.window_average(A_t, ts.pairs.windows)
    if row_mask is not None:  # rows that do not count (padding; image rows under vat_queries=text)
        A_s, A_t = A_s * row_mask[None, :, :, None], A_t * row_mask[None, :, :, None]
    vat = ad.vat_loss(A_s, A_t, sample_mask=has_img, **ts.vat_settings.loss_kwargs())
    lm = F.cross_entropy(out_s.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                         ignore_index=IGNORE_INDEX)
    # KD as the reference computes it: softmaxes over every position, then masked (here with the right shift)
    tau, pred = ts.kd_temperature, labels[:, 1:] != IGNORE_INDEX
    kl = F.kl_div((out_s.logits[:, :-1].float() / tau).log_softmax(-1), (logits_t[:, :-1].float() / tau).log_softmax(-1),
                  log_target=True, reduction="none").sum(-1)
    kd = (kl * pred).sum() / pred.sum() * tau ** 2
    return dict(lm=lm, kd=kd, vat=vat, total=lm + ts.kd_weight * kd + ts.vat_weight * vat)


def compute(ts, batch, settings, eager):
    """The losses of one step with the VAT settings `settings` (None: no VAT): our training path, or (eager) the
    reference code's way."""
    for m in (ts.student, ts.teacher):
        m.llm.set_attn_implementation("eager" if eager else ad.ATTN_IMPLEMENTATION)
    if settings is not None:
        ts.vat_settings = settings
    if eager:
        return reference_losses(ts, batch)
    return ts(batch, with_vat=settings is not None)


def losses(ts, batch, mode):
    return compute(ts, batch, MODES[mode], eager=mode == "reference")


def form(settings):
    return "-" if settings is None else f"{settings.vat_queries}/{settings.vat_pool}"


def check(ts, batch, rtol, mode, decisive=True):
    """The losses of `mode`'s training path and of the output_attentions way computing the same VAT form, on the same
    batch and weights, and their relative differences (decisive=False: reported only, as the bf16 check after a
    float32 one)."""
    with torch.no_grad():
        ours, ref = compute(ts, batch, MODES[mode], eager=False), compute(ts, batch, MODES[mode], eager=True)
    res = {"mode": mode, "vat": dataclasses.asdict(MODES[mode]), "dtype": str(next(ts.student.parameters()).dtype)[6:],
           "rtol": rtol, "decisive": decisive, "losses": {}}
    for k in ("lm", "kd", "vat"):
        a, b = float(ours[k]), float(ref[k])
        res["losses"][k] = dict(ours=a, reference=b, abs_diff=abs(a - b), rel_diff=abs(a - b) / max(abs(b), 1e-30))
    res["passed"] = all(v["rel_diff"] <= rtol for v in res["losses"].values())
    return res


def cpu_memory_available():  # Linux with glibc
    return os.access("/proc/self/clear_refs", os.W_OK) and hasattr(ctypes.CDLL(None), "malloc_trim")


def cpu_rss(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def step(ts, batch, mode, opt, dev, probe=False, compiled=False):
    """One step: (seconds, peak bytes, peak - start bytes, bytes saved for backward, losses, this process's CPU
    seconds); GPU memory is measured in every step, CPU memory and saved bytes only when probing (saved: not with
    --compile)."""
    cuda, cpu_mem = dev.type == "cuda", probe and dev.type == "cpu" and cpu_memory_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif cpu_mem:
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)  # free heap pages go back to the OS: RSS ~ live memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = cpu_rss("VmRSS")
    params, saved, count = {p.untyped_storage().data_ptr() for p in ts.student.parameters()}, {}, probe and not compiled

    def pack(t):  # count each storage autograd keeps once; parameters are not activations
        st = t.untyped_storage()
        saved[st.data_ptr()] = 0 if st.data_ptr() in params else st.nbytes()
        return t
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else contextlib.nullcontext():
        out = losses(ts, batch, mode)
    out["total"].backward()
    if opt is not None:
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() if cuda else cpu_rss("VmHWM") if cpu_mem else None
    for p in ts.student.parameters():
        p.grad = None
    return (dt, peak, None if peak is None else peak - base, sum(saved.values()) if count else None,
            {k: float(out[k].detach()) for k in ("lm", "kd", "vat")}, dc)


def lm_flops(llm, B, T, n_sup):
    c = llm.config
    d = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    emb = {id(w): w.numel() for w in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)}
    n = sum(p.numel() for p in llm.parameters()) - sum(emb.values())
    return 2 * n * B * T + 4 * c.num_hidden_layers * d * T * B * T + 2 * c.vocab_size * c.hidden_size * n_sup


def model_flops(ts, batch):
    (B, T), n_sup = batch["input_ids"].shape, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    v, nv = ts.student.vision_tower, ts.student.num_image_tokens
    f_vis = B * (2 * sum(p.numel() for p in v.parameters()) * nv + 4 * v.config.num_hidden_layers * v.config.hidden_size * nv ** 2)
    return f_vis + lm_flops(ts.teacher.llm, B, T, n_sup) + 3 * lm_flops(ts.student.llm, B, T, n_sup)


def main(cfg):
    preset, modes, steps, warmup, device, dtype, threads = (cfg[k] for k in (
        "preset", "modes", "steps", "warmup", "device", "dtype", "threads"))
    check_dtype, check_rtol, optimizer, compile, grad_ckpt, peak_tflops = (cfg[k] for k in (
        "check_dtype", "check_rtol", "optimizer", "compile", "grad_ckpt", "peak_tflops"))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}': use one of {list(PRESETS)}")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if not mode_list or set(mode_list) - set(MODES):
        raise ValueError(f"bad modes '{modes}': a comma-separated subset of {','.join(MODES)}")
    # one check per VAT form timed: ours (the paper's form), ours_ref for ours_ref and reference
    checked = list(dict.fromkeys("ours_ref" if m == "reference" else m for m in mode_list if MODES[m] is not None))
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    run_dtype = resolve_dtype(dtype, dev, allowed=("auto", "float32", "bfloat16", "float16"))
    p = PRESETS[preset]
    ts = build(p, dev)
    batch = make_batch(p, ts.student.num_image_tokens, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res = dict(preset=preset, device=name, dtype=str(run_dtype)[6:], torch=torch.__version__, config=cfg, checks=[])
    if check_dtype:
        rtol = check_rtol or (1e-4 if dev.type == "cuda" else 1e-5)  # CUDA: SDPA and eager kernels differ more
        cast(ts, getattr(torch, check_dtype))
        res["checks"] += [check(ts, batch, rtol, m) for m in checked]
    cast(ts, run_dtype)
    if check_dtype and run_dtype != getattr(torch, check_dtype):
        res["checks"] += [check(ts, batch, BF16_RTOL, m, decisive=False) for m in checked]
    if grad_ckpt:
        enable_checkpointing(ts.student.llm)
    if compile:
        ts.student.llm.base_model.compile()
    B, T = batch["input_ids"].shape
    res["shape"] = dict(batch=B, seq_len=T, image_tokens=ts.student.num_image_tokens,
                        supervised=int((batch["labels"] != IGNORE_INDEX).sum()),
                        student_llm_params=sum(x.numel() for x in ts.student.llm.parameters()),
                        teacher_llm_params=sum(x.numel() for x in ts.teacher.llm.parameters()),
                        student_layers=ts.pairs.student, teacher_windows=ts.pairs.windows)
    flops = model_flops(ts, batch)
    peak_flops = (peak_tflops * 1e12 or next((v for k, v in PEAK_BF16 if k in name), 0.0)) if dev.type == "cuda" else 0.0
    res.update(model_flops_per_step=flops, peak_flops=peak_flops or None)
    res["memory_method"] = ("torch.cuda.max_memory_allocated in the timed steps" if dev.type == "cuda" else
                            "VmHWM (peak RSS) in an extra untimed step" if cpu_memory_available() else None)
    opt = torch.optim.AdamW([x for x in ts.student.parameters() if x.requires_grad], lr=1e-6) if optimizer else None
    runs = {m: [] for m in mode_list}
    for i in range(warmup + steps):
        for m in mode_list:  # alternate the modes: machine noise hits them alike
            r = step(ts, batch, m, opt, dev, compiled=compile)
            if i >= warmup:
                runs[m].append(r)
    res["results"] = {}
    for m, rs in runs.items():
        _, peak, delta, saved, _, _ = step(ts, batch, m, opt, dev, probe=True, compiled=compile)
        if dev.type == "cuda":
            peak, delta = max(r[1] for r in rs), max(r[2] for r in rs)
        t = statistics.median(r[0] for r in rs)
        mib = lambda x: None if x is None else x / MIB  # noqa: E731
        res["results"][m] = dict(vat=MODES[m] and dataclasses.asdict(MODES[m]),  # the VAT settings this row passes
                                 step_s=t, step_s_all=[r[0] for r in rs], tokens_per_s=B * T / t,
                                 cpu_s=statistics.median(r[5] for r in rs) if dev.type == "cpu" else None,
                                 peak_mem_mib=mib(peak), step_mem_mib=mib(delta), saved_mib=mib(saved),
                                 mfu=flops / t / peak_flops if peak_flops else None, losses=rs[-1][4])
    R = res["results"]
    res["ratios"] = {f"{a}/{b}": {k: R[a][k] / R[b][k] if R[b][k] else None
                                  for k in ("step_s", "cpu_s", "peak_mem_mib", "step_mem_mib", "saved_mib")}
                     for a, b in RATIOS if a in R and b in R}
    for pair, ratio in res["ratios"].items():  # step i of a and of b ran back to back: drifts less with the load
        a, b = pair.split("/")
        ratio["step_s_paired"] = statistics.median(x / y for x, y in zip(R[a]["step_s_all"], R[b]["step_s_all"]))
    report(res)
    if cfg["json_out"]:
        os.makedirs(os.path.dirname(os.path.abspath(cfg["json_out"])), exist_ok=True)
        with open(cfg["json_out"], "w") as f:
            json.dump(res, f, indent=2)
    return res


def report(res):
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    sh = res["shape"]
    print(f"{res['preset']} on {res['device']}, {res['dtype']}: batch {sh['batch']} x {sh['seq_len']} tokens "
          f"({sh['image_tokens']} image), student LM {sh['student_llm_params'] / 1e6:.1f}M, teacher LM "
          f"{sh['teacher_llm_params'] / 1e6:.1f}M; memory: {res['memory_method']}")
    for c in res["checks"]:
        verdict = ("passed" if c["passed"] else "FAILED") + ("" if c["decisive"] else " (for information)")
        diffs = ", ".join(f"{k} {v['ours']:.7g} vs {v['reference']:.7g} (rel {v['rel_diff']:.1e})" for k, v in c["losses"].items())
        print(f"check {c['mode']} = output_attentions, VAT {form(MODES[c['mode']])}, in {c['dtype']} "
              f"(rtol {c['rtol']:g}) {verdict}: {diffs}")
    print(f"{'mode':<10} {'VAT':<13} {'step ms':>9} {'CPU ms':>8} {'tokens/s':>10} {'peak MiB':>10} {'step MiB':>10} "
          f"{'saved MiB':>10} {'MFU':>6}")
    for m, r in res["results"].items():
        cpu_ms = fmt(r["cpu_s"] and 1e3 * r["cpu_s"], "8.1f")
        print(f"{m:<10} {form(MODES[m]):<13} {1e3 * r['step_s']:>9.1f} {cpu_ms:>8} {r['tokens_per_s']:>10.0f} "
              f"{fmt(r['peak_mem_mib'], '10.1f'):>10} "
              f"{fmt(r['step_mem_mib'], '10.1f'):>10} {fmt(r['saved_mib'], '10.1f'):>10} "
              f"{fmt(r['mfu'] and 100 * r['mfu'], '5.1f'):>6}")
    for k, v in res["ratios"].items():
        cpu = "" if v["cpu_s"] is None else f", CPU time {v['cpu_s']:.2f}x"
        print(f"{k}: time {fmt(v['step_s'], '.2f')}x (median of per-step ratios {v['step_s_paired']:.2f}x){cpu}, "
              f"peak memory {fmt(v['peak_mem_mib'], '.2f')}x, "
              f"step memory {fmt(v['step_mem_mib'], '.2f')}x, saved for backward {fmt(v['saved_mib'], '.2f')}x")


if __name__ == "__main__":
    res = cli(lambda: main(configure(dict(DEFAULTS), sys.argv[1:], __doc__, [__file__])))
    if res is not None and any(c["decisive"] and not c["passed"] for c in res["checks"]):
        sys.exit("our training path and the output_attentions way disagree beyond check_rtol (see the check lines)")
