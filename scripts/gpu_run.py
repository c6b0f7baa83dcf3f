"""Device run: GPU-vs-CPU correctness, then full-size speed with synthetic weights.

Stages (each guarded; results go to OUT/results.json, logs to stdout):
  check    tiny model: CUDA (Triton + CUDA-graph decode) vs the CPU reference, both quant_sim
  width    Flash-width 4-layer q2 model: GPU vs CPU reference logits; per-layer decode time
  full     43-layer q2 model made on the GPU: memory, prefill at 8K, decode at 4K/32K/128K/1M
           (beyond the prefilled frontier the cache is filled with random rows: the speed of a
           step does not depend on the values), bench CSV, a decode-step profile
  speed    the same model: one timed 8K prefill, decode at 4K/128K/1M (a short device budget)
  profile  the same model: decode at 4K and its profile (decode_profile.txt) only
Usage: python scripts/gpu_run.py OUT stage [stage...]
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from ds4py import Engine
from ds4py.bench import frontiers, run, to_csv
from ds4py.config import FLASH, Shape
from ds4py.model.model import fp4_sim, fp8_sim, round_rope_f16
from ds4py.synth import demo_shape

OUT = Path(sys.argv[1])
RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1)).max())


def sync():
    torch.cuda.synchronize()


def ids_for(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_on_gpu(shape, seed, sim):
    """The same model with the torch reference ops on the GPU: isolates kernel precision."""
    from ds4py.engine import EngineOptions
    from ds4py.model.load import bind
    from ds4py.model.model import Transformer
    from ds4py.quant.ops import Ops
    from ds4py.synth import synthetic_tensors

    ops = Ops("cuda")
    model = Transformer(shape, ops, quant_sim=sim)
    makers = {sp.name: m for sp, _, m in synthetic_tensors(shape, "q2", seed)}
    bind(model, makers, ops, torch.device("cuda"))
    return Engine(shape, model, EngineOptions(device="cuda", quant_sim=sim), {})


def cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), -1).min())


def stage_check():
    out = {}
    for sim in (False, True):
        cpu = Engine.synthetic(demo_shape(), device="cpu", seed=1, quant_sim=sim)
        gpu = Engine.synthetic(
            demo_shape(), device="cuda", seed=1, quant_sim=sim, generate_on="cpu"
        )
        refg = reference_on_gpu(demo_shape(), 1, sim)
        ids = ids_for(300, 129280)
        a, b, c = cpu.score(ids), gpu.score(ids), refg.score(ids)
        sc, sg, sr = cpu.new_session(512), gpu.new_session(512), refg.new_session(512)
        sc.sync(ids[:200]), sg.sync(ids[:200]), sr.sync(ids[:200])
        worst, worst_ref, cmin = 0.0, 0.0, 1.0
        for t in ids[200:260]:
            lc, lg, lr = sc.eval(t), sg.eval(t), sr.eval(t)
            worst = max(worst, rel(lg[None], lc[None]))
            worst_ref = max(worst_ref, rel(lr[None], lc[None]))
            cmin = min(cmin, cos(lg[None], lc[None]))
        out[f"sim={sim}"] = {
            "triton_score_rel": rel(b, a),
            "triton_score_cos_min": cos(b, a),
            "triton_decode_rel": worst,
            "triton_decode_cos_min": cmin,
            "refops_gpu_score_rel": rel(c, a),
            "refops_gpu_decode_rel": worst_ref,
        }
        log("check", sim, out[f"sim={sim}"])
    RESULTS["check"] = out


def flash(n_layer: int) -> Shape:
    return Shape(**{**FLASH, "n_layer": n_layer})


def time_decode(sess, n: int, start_token: int = 1) -> float:
    logits = sess.eval(start_token)  # the eager warm step and the capture stay untimed
    for _ in range(2):
        logits = sess.eval(int(logits.argmax()))
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        logits = sess.eval(int(logits.argmax()))
    sync()
    return (time.perf_counter() - t0) / n


def stage_width():
    shape = flash(4)
    gpu = Engine.synthetic(shape, device="cuda", seed=2, generate_on="cpu")
    cpu = Engine.synthetic(shape, device="cpu", seed=2)
    ids = ids_for(24, shape.n_vocab, 3)
    t0 = time.perf_counter()
    a = cpu.score(ids)
    log("cpu score", time.perf_counter() - t0)
    b = gpu.score(ids)
    sess = gpu.new_session(8192)
    sess.sync(ids_for(4096, shape.n_vocab, 4))
    step = time_decode(sess, 32)
    RESULTS["width"] = {
        "score_rel": rel(b, a),
        "score_cos_min": cos(b, a),
        "decode_step_ms_4_layers": step * 1e3,
    }
    log("width", RESULTS["width"])


def fill(sess, n: int) -> None:
    """Pretend n tokens are cached: random rows of the right kinds (speed runs only)."""
    st, s = sess.state, sess.engine.shape
    g = torch.Generator("cuda").manual_seed(0)
    for L in st.layers:
        L.raw.copy_(
            round_rope_f16(
                fp8_sim(torch.randn(L.raw.shape, generator=g, device="cuda"), s.n_nope), s.n_rot
            )
        )
        if L.ratio:
            k = n // L.ratio
            for i in range(0, k, 65536):
                m = min(65536, k - i)
                rows = torch.randn(m, s.head_dim, generator=g, device="cuda")
                L.comp.put(i, round_rope_f16(fp8_sim(rows, s.n_nope), s.n_rot))
                if L.ratio == 4:
                    idx = torch.randn(m, s.indexer_head_dim, generator=g, device="cuda")
                    L.index.put(i, fp4_sim(idx))
            L.n_comp = k
    st.pos = n
    sess.tokens = [1] * n


def stage_full():
    shape = flash(43)
    t0 = time.perf_counter()
    eng = Engine.synthetic(shape, device="cuda", seed=5)
    sync()
    res = {
        "build_s": time.perf_counter() - t0,
        "weights_gib": torch.cuda.memory_allocated() / 2**30,
    }
    log("built", res)
    # prefill 8K (one chunk on CUDA), then decode at 4K
    res["prefill_chunk"] = eng.chunk
    ids = ids_for(8192 + 64, shape.n_vocab, 6)
    sess = eng.new_session(16384)
    sess.sync(ids[:8192])  # warm: compiles the prefill shapes
    for i in range(2):
        sess.rewind(0)
        sync()
        t0 = time.perf_counter()
        sess.sync(ids[:8192])
        sync()
        res[f"prefill_8k_tps_{i}"] = 8192 / (time.perf_counter() - t0)
        log("prefill 8k", res[f"prefill_8k_tps_{i}"])
    prof_prefill(sess, ids)
    sess.rewind(4096)
    res["decode_4k_tps"] = 1 / time_decode(sess, 64)
    res["cuda_graph"] = sess._decoder.graph is not None
    log("decode 4k", res["decode_4k_tps"], "graph", res["cuda_graph"])
    RESULTS["full"] = res
    prof(sess, "full")
    del sess
    for ctx in (32768, 131072, 1048576):
        torch.cuda.reset_peak_memory_stats()
        s2 = eng.new_session(ctx)
        fill(s2, ctx - 256)
        tps = 1 / time_decode(s2, 16)
        res[f"decode_{ctx}_tps"] = tps
        res[f"peak_gib_{ctx}"] = torch.cuda.max_memory_allocated() / 2**30
        res[f"kv_gib_{ctx}"] = s2.state.nbytes() / 2**30
        log("decode", ctx, tps, res[f"peak_gib_{ctx}"])
        del s2
        torch.cuda.empty_cache()
    RESULTS["full"] = res
    bench_ids = ids_for(32768 + 64, shape.n_vocab, 7)
    rows = run(eng, bench_ids, frontiers(8192, 32768, 8192, None), 32, 32768 + 64, log=log)
    (OUT / "bench_full_q2.csv").write_text(to_csv(rows))


def stage_speed():
    """`full` without profiles and bench: prefill 8K, decode at 4K / 32K / 128K / 1M."""
    shape = flash(43)
    eng = Engine.synthetic(shape, device="cuda", seed=5)
    res = RESULTS.setdefault("speed", {})
    ids = ids_for(8192 + 64, shape.n_vocab, 6)
    sess = eng.new_session(16384)
    sess.sync(ids[:8192])  # warm: compiles the prefill shapes
    sess.rewind(0)
    sync()
    t0 = time.perf_counter()
    sess.sync(ids[:8192])
    sync()
    res["prefill_8k_tps"] = 8192 / (time.perf_counter() - t0)
    log("prefill 8k", res["prefill_8k_tps"])
    sess.rewind(4096)
    res["decode_4k_tps"] = 1 / time_decode(sess, 64)
    log("decode 4k", res["decode_4k_tps"], "graph", sess._decoder.graph is not None)
    del sess
    for ctx in (131072, 1048576):
        s2 = eng.new_session(ctx)
        fill(s2, ctx - 256)
        res[f"decode_{ctx}_tps"] = 1 / time_decode(s2, 16)
        log("decode", ctx, res[f"decode_{ctx}_tps"])
        del s2
        torch.cuda.empty_cache()


def stage_profile():
    """The decode step at 4K (cache filled with random rows): the profiler's kernel table."""
    eng = Engine.synthetic(flash(43), device="cuda", seed=5)
    sess = eng.new_session(8192)
    fill(sess, 4096)
    RESULTS.setdefault("profile", {})["decode_4k_tps"] = 1 / time_decode(sess, 32)
    prof(sess, "profile")


def prof_prefill(sess, ids):
    from torch.profiler import ProfilerActivity, profile

    sess.rewind(0)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        sess.sync(ids[:8192])
        sync()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (OUT / "prefill_profile.txt").write_text(table)


def prof(sess, stage: str):
    from torch.profiler import ProfilerActivity, profile

    logits = sess.eval(1)
    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        for _ in range(3):
            logits = sess.eval(int(logits.argmax()))
        sync()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=200)
    (OUT / "decode_profile.txt").write_text(table)
    n_kernels = sum(e.count for e in p.key_averages() if e.device_type.name == "CUDA")
    RESULTS.setdefault(stage, {})["kernels_per_token"] = n_kernels / 3
    log(table[:4000])


STAGES = {
    "check": stage_check,
    "width": stage_width,
    "full": stage_full,
    "speed": stage_speed,
    "profile": stage_profile,
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64  # several shapes in one process
    torch._logging.set_logs(graph_breaks=True)
    RESULTS["device"] = torch.cuda.get_device_name()
    for name in sys.argv[2:]:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                STAGES[name]()
        except Exception:
            RESULTS[f"{name}_error"] = traceback.format_exc()
            log(traceback.format_exc())
        RESULTS[f"{name}_s"] = time.perf_counter() - t0
        (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1))
    log(json.dumps(RESULTS, indent=1))
