"""GPU figures in one short run (issue 9, and the GPU targets of #4): training image-steps/s over
all 42 regions, prediction particle·region/s, each with its FLOP count (XLA:CPU's cost analysis of
the same programs with direct convolutions: XLA:GPU's leaves out library calls) against the card's
measured matmul ceilings (float32 at default and highest precision, bfloat16).

    python benchmarks/gpu.py --out results/gpu.json [--boxes 120 64] [--regions 42] [--align]

Training: the loop over regions that `deepalign train` runs on one device (CPU or GPU; each
region its own balanced, augmented batch of 128, batches made ahead, one jitted update per step),
the vmapped formulation (all regions' nets stacked; what it runs over several GPUs) for every
`--train-impls` conv implementation, one region alone and the shared-trunk net. Prediction: `predict_probs` with the stacked nets ("vmap",
what "auto" picks on an accelerator) at several chunk sizes, and the loop. Compilation is timed
apart (first call) and excluded from the rates. Every section runs in its own process, killed
after `--section-timeout` s, and none starts after `--budget` s; each is written to the JSON as
soon as it ends, and one that fails or hangs records that instead of stopping the run (the
device lease is 15 minutes, and the first run lost 7 of them to one stuck convolution). Random
images, random nets: speed only (accuracy is the CPU benchmarks' and the tests' business).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_predict import jax_one_net_predict_rate, jax_predict_rate, jax_train_rate, predict_flops_per_image, train_step_flops  # noqa: E402

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import cnn, training  # noqa: E402


def matmul_tflops(size: int, dtype, precision=None, reps: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision))
    jax.block_until_ready(f(a))
    t = time.perf_counter()
    for _ in range(reps):
        r = f(a)
    jax.block_until_ready(r)
    return reps * 2 * size**3 / (time.perf_counter() - t) / 1e12


def _stacked_data(n_regions: int, box: int, n_images: int = 2048, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((n_images, box, box)).astype(np.float32))
    labels = np.arange(n_images) % n_regions
    cols = [[], [], [], []]
    for r in range(n_regions):
        pos, neg = np.flatnonzero(labels == r), np.flatnonzero(labels != r)
        for i, v in enumerate((training._padded(pos, n_images), pos.size, training._padded(neg, n_images), neg.size)):
            cols[i].append(v)
    return images, [jnp.asarray(np.stack(c).astype(np.int32)) for c in cols]


def train_vmap(box: int, n_regions: int, n_steps: int, impl: str, cfg: TrainConfig) -> dict:
    """image-steps/s of all n_regions nets trained together (the accelerator's formulation).
    impl: a conv implementation for every layer or one per layer ("fft/fft/direct"), optionally
    "+tf32" or "+bf16" (run under that
    `jax.default_matmul_precision`: convolutions and matmuls in that input precision)."""
    impl, _, precision = impl.partition("+")
    if precision:
        with jax.default_matmul_precision({"tf32": "tensorfloat32", "bf16": "bfloat16"}[precision]):
            r = train_vmap(box, n_regions, n_steps, impl, cfg)
        r["precision"] = precision
        return r
    model = cnn.build_model(cnn.architecture(cfg, box, 1), impl if "/" not in impl else "auto")
    if "/" in impl:  # one implementation per layer, e.g. "fft/fft/direct"
        model = model.clone(conv_impls=tuple(impl.split("/")))
    variables = training.init_region_params(jax.random.key(0), cfg, box, n_regions)
    tx = optax.adam(cfg.learning_rate)
    stack = lambda name, vs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *vs)
    params = stack("params", [v["params"] for v in variables])
    bstats = stack("batch_stats", [v["batch_stats"] for v in variables])
    opt = jax.vmap(tx.init)(params)
    images, data = _stacked_data(n_regions, box)
    epoch = training._region_epoch_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, float(cfg.max_shift_frac * box))[1]
    keys = jax.random.split(jax.random.key(1), n_regions)
    t = time.perf_counter()
    out = epoch(params, bstats, opt, images, *data, keys)
    jax.block_until_ready(out)
    first = time.perf_counter() - t
    times = []
    for rep in range(2):
        keys = jax.random.split(jax.random.key(2 + rep), n_regions)
        t = time.perf_counter()
        out = epoch(out[0], out[1], out[2], images, *data, keys)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    best = min(times)
    rate = n_regions * n_steps * cfg.batch_size / best
    return {"impl": impl, "conv_impls": list(model.conv_impls), "regions": n_regions, "steps": n_steps, "first_call_s": first,
            "epoch_s": times, "image_steps_per_s": rate, "ms_per_step": 1e3 * best / n_steps,
            "finite": bool(np.isfinite(np.asarray(out[3])).all())}


def train_loop(box: int, n_regions: int, n_steps: int, cfg: TrainConfig) -> dict:
    """image-steps/s of n_regions nets trained one after another (what `deepalign train` runs on
    one device: each region's epoch one jitted update per step, its batches made ahead)."""
    model = cnn.build_model(cnn.architecture(cfg, box, 1), "auto")
    variables = training.init_region_params(jax.random.key(0), cfg, box, n_regions)
    opt = [optax.adam(cfg.learning_rate).init(v["params"]) for v in variables]
    images, data = _stacked_data(n_regions, box)
    epoch = training._region_epoch_fn(model, float(cfg.learning_rate), n_steps, cfg.batch_size, float(cfg.max_shift_frac * box))[0]

    def run(seed):
        outs = [epoch(v["params"], v["batch_stats"], o, images, *(d[r] for d in data), jax.random.key(seed + r))
                for r, (v, o) in enumerate(zip(variables, opt))]
        jax.block_until_ready(outs)
        return outs

    t = time.perf_counter()
    run(100)
    first = time.perf_counter() - t
    times = []
    for rep in range(2):
        t = time.perf_counter()
        outs = run(200 + 100 * rep)
        times.append(time.perf_counter() - t)
    return {"conv_impls": list(model.conv_impls), "regions": n_regions, "steps": n_steps, "first_call_s": first, "epoch_s": times,
            "image_steps_per_s": n_regions * n_steps * cfg.batch_size / min(times),
            "finite": bool(all(np.isfinite(float(o[3])) for o in outs))}


def conv_layers(box: int, n_regions: int, cfg: TrainConfig, reps: int = 5) -> dict:
    """ms of each conv layer's forward + both gradients at batch 128: the vmapped (grouped over
    regions, each its own images and weights) form against one ungrouped conv on all the images
    (one set of weights): the price of the grouped convolutions that vmapping nets makes."""
    kernels = cnn.kernel_sizes(box, cfg.kernel_fractions)
    chans = (1, *cfg.conv_filters)
    res, size = {}, box
    rng = np.random.default_rng(0)
    for i, k in enumerate(kernels):
        cin, cout = chans[i], chans[i + 1]
        x = jnp.asarray(rng.standard_normal((n_regions, cfg.batch_size, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((n_regions, k, k, cin, cout)) * 0.01, jnp.float32)
        loss = lambda x, w: jnp.sum(cnn.conv2d_direct(x, w) ** 2)
        grouped = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))
        flat = jax.jit(jax.grad(loss, argnums=(0, 1)))
        xf = x.reshape((-1,) + x.shape[2:])
        row = {"kernel": k, "cin": cin, "cout": cout, "size": size}
        for name, f, args in (("grouped_ms", grouped, (x, w)), ("one_conv_ms", flat, (xf, w[0]))):
            jax.block_until_ready(f(*args))
            t = time.perf_counter()
            for _ in range(reps):
                r = f(*args)
            jax.block_until_ready(r)
            row[name] = 1e3 * (time.perf_counter() - t) / reps
        res[f"layer{i}"] = row
        size //= 2
    return res


def _predict(box, n, cfg, parallel, bs, n_regions):
    import train_predict

    parallel = _apply_modifiers(parallel)
    train_predict.N_REGIONS = n_regions
    return jax_predict_rate(box, n, cfg, parallel, bs)


def _apply_modifiers(spec: str) -> str:
    """Strip "@MOD" suffixes off a prediction spec and apply them to this (section's own) process:
    "@bcast" / "@unroll" — the FFT path's channel sum as multiply + reduce or as a chain of
    multiply-adds (`cnn.SPECTRAL_PRODUCT`);
    "@scaled" / "@fwd" — inverse FFTs as XLA's own (followed by a scaling pass on GPUs) or as
    forward transforms of the conjugate (`cnn.INVERSE_BY_FORWARD_FFT`; default: on accelerators);
    "@sync" — fetch each chunk's result before the next is dispatched (no overlap);
    "@p23" / "@p2" — FFT lengths with prime factors 2, 3 (or 2) only (`cnn._FFT_PRIMES`)."""
    spec, *mods = spec.split("@")
    for mod in mods:
        if mod in ("bcast", "unroll"):
            cnn.SPECTRAL_PRODUCT = "broadcast" if mod == "bcast" else "unrolled"
        elif mod == "sync":  # the chunk loop before it kept one chunk in flight: each result fetched at once
            training._chunked_logits = lambda fn, v, images, bs: np.concatenate(
                [np.asarray(fn(v, x))[:m] for _, m, x in training._padded_batches(images, bs)])
        elif mod in ("scaled", "fwd"):  # inverse FFTs as XLA's own (scaled) ones / as forward transforms
            cnn.INVERSE_BY_FORWARD_FFT = "never" if mod == "scaled" else "always"
        elif mod in ("p23", "p2"):
            cnn._FFT_PRIMES = (2, 3) if mod == "p23" else (2,)
        else:
            raise ValueError(f"unknown modifier @{mod}")
    return spec


def _predict_program(spec: str, box: int, n_regions: int, cfg: TrainConfig):
    """(spec without modifiers and tail, model, stacked random variables, jitted forward) of one
    prediction spec: "vmap", "vmap_pre" or "shared_vmap:IMPL[+DTYPE]", "/TAIL", "@MOD" (see
    `predict_variant`)."""
    spec = _apply_modifiers(spec)
    spec, _, tail = spec.partition("/")
    model = cnn.build_model(cnn.architecture(cfg, box, 1), "auto")
    if tail:
        tails = tail.split(",") if "," in tail else [tail] * (len(model.conv_impls) - 1)
        model = model.clone(conv_impls=(model.conv_impls[0], *tails))
    variables = training.init_region_params(jax.random.key(0), cfg, box, n_regions)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *variables)
    if spec == "vmap":
        return spec, model, stacked, training._logits_stacked_fn(model)
    if spec == "vmap_pre":  # kernel spectra computed once (`training._fft_eval_fns`), then the same forward per chunk
        prepare, forward = training._fft_eval_fns(model.clone(conv_impls=("fft",) * len(model.conv_impls)), box)
        return spec, model, jax.block_until_ready(prepare(stacked)), forward
    first_impl, _, dtype = (spec.partition(":")[2] or "direct").partition("+")
    return spec, model, stacked, training._logits_shared_vmap_fn(model, first_impl, dtype or None)


def predict_variant(box: int, n: int, cfg: TrainConfig, spec: str, bs: int, n_regions: int) -> dict:
    """particle·region/s of one prediction formulation at a fixed chunk of `bs` images (no memory
    cap): spec "vmap" (every layer vmapped, the model's "auto" convolutions) or
    "shared_vmap:IMPL[+DTYPE]" (`training._logits_shared_vmap_fn`: first layer of all nets as one
    convolution, the rest vmapped), optionally "/TAIL" — the conv implementation of layers 2…
    ("fft", "direct" or per layer "fft,direct"), and "@MOD" modifiers (`_apply_modifiers`)."""
    spec, model, stacked, fn = _predict_program(spec, box, n_regions, cfg)
    first_impl = (spec.partition(":")[2] or "direct").partition("+")[0]
    images = np.random.default_rng(1).standard_normal((n, box, box)).astype(np.float32)
    t = time.perf_counter()
    ref = training._chunked_logits(fn, stacked, images[:bs], bs)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = training._chunked_logits(fn, stacked, images, bs)
    dt = time.perf_counter() - t
    r = {"particle_regions_per_s": n * n_regions / dt, "first_call_s": first, "conv_impls": list(model.conv_impls),
         "finite": bool(np.isfinite(out).all()), "logit_scale": float(np.abs(ref).mean())}
    if "+" in spec:  # reduced precision: how far from the float32 program on the first chunk
        f32 = training._chunked_logits(training._logits_shared_vmap_fn(model, first_impl, None), stacked, images[:bs], bs)
        r["max_abs_logit_diff_vs_f32"] = float(np.abs(ref - f32).max())
    return r


def profile_predict(box: int, n_regions: int, bs: int, cfg: TrainConfig, trace_dir: Path, reps: int = 5, spec: str = "vmap") -> dict:
    """Where the vmapped prediction's time goes: the device compiler's own cost analysis of the
    program (FLOP, bytes accessed) and a `jax.profiler` trace of `reps` calls on one chunk of `bs`
    images, summarised by op/kernel name (total µs per call, top 25, from the trace's Perfetto
    JSON; the full trace stays in `trace_dir` for TensorBoard/Perfetto). spec: "vmap" or
    "shared_vmap:IMPL[+DTYPE]", with "@MOD" modifiers as in `predict_variant`."""
    import collections
    import gzip

    _, model, stacked, fn = _predict_program(spec, box, n_regions, cfg)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((bs, box, box)).astype(np.float32))
    cost = fn.lower(stacked, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(fn(stacked, x))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(stacked, x))
    per_call = (time.perf_counter() - t) / reps
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(fn(stacked, x))
    totals: collections.Counter = collections.Counter()
    for path in sorted(trace_dir.glob("**/*perfetto_trace.json.gz"), key=lambda q: q.stat().st_mtime)[-1:]:  # this run's
        data = json.load(gzip.open(path))
        for e in data["traceEvents"] if isinstance(data, dict) else data:
            if e.get("ph") == "X" and not e["name"].startswith("$"):  # "$file:line": Python frames
                totals[e["name"][:120]] += float(e.get("dur", 0.0)) / reps
    n_pr = bs * n_regions
    return {"conv_impls": list(model.conv_impls), "chunk": bs, "seconds_per_call": per_call,
            "particle_regions_per_s": n_pr / per_call,
            "device_cost_analysis": {k: float(v) for k, v in cost.items() if k in ("flops", "bytes accessed", "transcendentals")},
            "implied_TB_per_s": float(cost.get("bytes accessed", float("nan"))) / per_call / 1e12,
            "top_ops_us_per_call": [[name, round(us, 1)] for name, us in totals.most_common(25)]}


def _align(a) -> dict:
    dest = a.out.parent / "align_gpu.json"
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "align.py"), "--sizes", "120", "--settings", "pairs",
                        "--out", str(dest)], capture_output=True, text=True)
    return {"rc": p.returncode, "stdout": p.stdout[-4000:], "stderr": p.stderr[-2000:]}


def _cpu_flops(box: int, cfg: TrainConfig) -> dict:
    """FLOP per training step and per predicted image, from XLA:CPU's cost analysis of the
    programs with direct convolutions (XLA:GPU's cost analysis leaves out cuDNN/cuFFT calls)."""
    with jax.default_device(jax.devices("cpu")[0]):
        return {"kernels": list(cnn.kernel_sizes(box, cfg.kernel_fractions)),
                "train_step_gflop_per_region": train_step_flops(box, cfg, ("direct",) * 3) / 1e9,
                "predict_mflop_per_image": predict_flops_per_image(box, cfg, "direct") / 1e6}


def sections(a, cfg: TrainConfig) -> dict:
    """name -> zero-argument function, in the order they run."""
    if a.predict_impl != "auto":  # predict_probs builds its nets with "auto"
        build = cnn.build_model
        cnn.build_model = lambda arch, conv_impl="auto", backend=None: build(arch, a.predict_impl if conv_impl == "auto" else conv_impl, backend)
    n = a.matmul_size
    todo = {"matmul_tflops": lambda: {
        "size": n, "f32_default": matmul_tflops(n, jnp.float32), "f32_highest": matmul_tflops(n, jnp.float32, jax.lax.Precision.HIGHEST, 3),
        "bf16": matmul_tflops(n, jnp.bfloat16)}}
    for bi, box in enumerate(a.boxes):
        first = bi == 0
        if "flops" not in a.skip:
            todo[f"flops_{box}"] = lambda box=box: _cpu_flops(box, cfg)
        if first and a.conv_layers:
            todo[f"conv_layers_{box}"] = lambda box=box: conv_layers(box, a.regions, cfg)
        for mod in a.train_loop_mods if "train_loop" not in a.skip else []:
            todo[f"train_loop_{box}{mod}"] = lambda box=box, mod=mod: (_apply_modifiers(mod), train_loop(box, a.regions, a.steps, cfg))[1]
        for impl in a.train_impls if first else a.train_impls[:1]:
            todo[f"train_vmap_{box}_{impl}"] = lambda box=box, impl=impl: train_vmap(box, a.regions, a.steps, impl, cfg)
        if "one_region" not in a.skip:
            todo[f"train_one_region_{box}"] = lambda box=box: {"image_steps_per_s": jax_train_rate(box, a.steps * 4, cfg)}
        if "shared_trunk" not in a.skip:
            todo[f"train_shared_trunk_{box}"] = lambda box=box: {
                "image_steps_per_s": jax_train_rate(box, a.steps * 4, cfg, model_kind="shared_trunk")}
        if "polar" not in a.skip:  # one rotation-invariant net with a head per region (model: polar_trunk)
            todo[f"train_polar_trunk_{box}"] = lambda box=box: {
                "image_steps_per_s": jax_train_rate(box, a.steps * 4, cfg, model_kind="polar_trunk")}
            todo[f"predict_polar_trunk_{box}"] = lambda box=box: {
                "particle_regions_per_s": jax_one_net_predict_rate(box, a.predict_n, cfg, "polar_trunk", a.predict_batches[-1])}
        for mode in a.predict_modes:
            for bs in a.predict_batches if first else a.predict_batches[1:2]:
                todo[f"predict_{mode}_{box}_b{bs}"] = lambda box=box, bs=bs, mode=mode: {
                    "particle_regions_per_s": _predict(box, a.predict_n, cfg, mode, bs, a.regions)}
        for spec in a.predict_variants if first else []:
            for bs in a.variant_batches:
                todo[f"predict_variant_{box}_{spec}_b{bs}"] = lambda box=box, spec=spec, bs=bs: predict_variant(
                    box, a.predict_n, cfg, spec, bs, a.regions)
        for impl in a.one_region_impls if first else []:
            todo[f"train_one_region_{box}_{impl}"] = lambda box=box, impl=impl: {
                "image_steps_per_s": jax_train_rate(box, a.steps * 4, cfg, impls=(impl,) * 3)}
        if "loop" not in a.skip:
            todo[f"predict_loop_{box}"] = lambda box=box: {
                "particle_regions_per_s": _predict(box, a.predict_n // 4, cfg, "loop", 512, a.regions)}
        for spec in a.profile if first else []:
            todo[f"profile_predict_{box}_{spec}"] = lambda box=box, spec=spec: profile_predict(
                box, a.regions, a.predict_batches[-1], cfg, a.out.parent / f"trace_predict_{box}_{len(todo)}", spec=spec)
        if first and a.align:
            todo["align_120_pairs"] = lambda: _align(a)
    return todo


def run_one(fn) -> dict:
    t = time.perf_counter()
    try:
        r = fn()
    except Exception as e:  # a failed section is recorded, the run goes on
        r = {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
    r["section_s"] = round(time.perf_counter() - t, 1)
    return r


def run_isolated(name: str, timeout: float) -> dict:
    """One section in its own process (this script with --section), killed after `timeout` s: a
    section that hangs (run 1: a grouped convolution's autotuning) costs its timeout, not the lease."""
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *sys.argv, "--section", name], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "section_s": round(time.perf_counter() - t, 1)}
    for line in p.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    return {"error": f"exit {p.returncode}, no result", "stderr": p.stderr[-3000:], "section_s": round(time.perf_counter() - t, 1)}


_RESULT = "RESULT "


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--boxes", type=int, nargs="+", default=[120, 64])
    ap.add_argument("--regions", type=int, default=42)
    ap.add_argument("--steps", type=int, default=4, help="training steps per timed epoch")
    ap.add_argument("--train-impls", nargs="*", default=["auto", "fft/fft/direct", "fft/direct/direct"],
                    help="conv implementations (optionally +tf32 / +bf16) for the first box; the other boxes time the first only")
    ap.add_argument("--train-loop-mods", nargs="*", default=[""],
                    help="train_loop sections, one per modifier string (e.g. '' '@scaled'; see _apply_modifiers)")
    ap.add_argument("--predict-n", type=int, default=8192)
    ap.add_argument("--predict-batches", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--predict-modes", nargs="*", default=["vmap"],
                    help="`predict_probs` region_parallel modes timed at --predict-batches (its memory cap applies), "
                         "with @MOD modifiers, e.g. vmap vmap_pre vmap_pre@unroll")
    ap.add_argument("--predict-impl", default="auto", help="conv implementation of the nets in predict")
    ap.add_argument("--predict-variants", nargs="*", default=[],
                    help="prediction formulations for the first box, at --variant-batches, without the memory cap: "
                         "vmap[/TAIL], vmap_pre or shared_vmap:IMPL[+DTYPE][/TAIL], with @MOD modifiers, "
                         "e.g. shared_vmap:direct+bfloat16/fft, vmap_pre@unroll")
    ap.add_argument("--variant-batches", type=int, nargs="+", default=[256])
    ap.add_argument("--one-region-impls", nargs="*", default=[],
                    help="also train one region alone (ungrouped convolutions) with this conv implementation for every layer")
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--conv-layers", action="store_true", help="time each conv layer grouped (vmapped) vs one conv")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: flops train_loop one_region shared_trunk polar loop")
    ap.add_argument("--profile", nargs="*", default=[],
                    help="profile these prediction specs (as --predict-variants; 'vmap' is predict's default) at the "
                         "first box: cost analysis + jax.profiler trace next to --out")
    ap.add_argument("--align", action="store_true", help="also benchmarks/align.py --sizes 120 --settings pairs (subprocess)")
    ap.add_argument("--section-timeout", type=float, default=120, help="seconds before a section's process is killed")
    ap.add_argument("--align-timeout", type=float, default=240, help="seconds before the alignment section is killed")
    ap.add_argument("--budget", type=float, default=480, help="seconds after which no further section starts")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section, print its result
    a = ap.parse_args()
    cfg = TrainConfig()
    todo = sections(a, cfg)
    if a.section:
        print(_RESULT + json.dumps(run_one(todo[a.section]), default=float), flush=True)
        return
    a.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "host": platform.machine(), "argv": sys.argv[1:]}
    print(json.dumps(out), flush=True)
    t0 = time.perf_counter()
    for name in todo:
        left = a.budget - (time.perf_counter() - t0)
        if left < 5:
            out[name] = {"error": "not run: --budget spent"}
            continue
        limit = max(a.section_timeout, a.align_timeout) if name.startswith("align") else a.section_timeout
        out[name] = run_isolated(name, min(limit, left))
        print(f"== {name}: {json.dumps(out[name], default=float)[:1500]}", flush=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=float))
        tmp.replace(a.out)
    out["achieved"] = achieved(out, a.boxes, cfg)
    print("== achieved:", json.dumps(out["achieved"], default=float), flush=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(a.out)


def achieved(out: dict, boxes, cfg: TrainConfig) -> dict:
    """TFLOP/s of each measured rate, counting the direct convolutions' FLOP (flops_<box>)."""
    summary = {}
    for box in boxes:
        f = out.get(f"flops_{box}", {})
        for key, val in out.items():
            if not isinstance(val, dict) or "error" in val or not key.startswith((f"train_vmap_{box}_", f"predict_vmap_{box}_", f"predict_variant_{box}_")):
                continue
            if key.startswith("train") and "train_step_gflop_per_region" in f:
                summary[key] = val["image_steps_per_s"] / cfg.batch_size * f["train_step_gflop_per_region"] / 1e3
            elif key.startswith("predict") and "predict_mflop_per_image" in f:
                summary[key] = val["particle_regions_per_s"] * f["predict_mflop_per_image"] / 1e6
    return summary


if __name__ == "__main__":
    main()
