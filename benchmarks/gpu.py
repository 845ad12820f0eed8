"""GPU figures in one short run (issue 9, and the GPU targets of #4): training image-steps/s over
all 42 regions, prediction particle·region/s, each with its FLOP count (XLA:CPU's cost analysis of
the same programs with direct convolutions: XLA:GPU's leaves out library calls) against the card's
measured matmul ceilings (float32 at default and highest precision, bfloat16).

    python benchmarks/gpu.py --out results/gpu.json [--boxes 120 64] [--regions 42] [--align]

Training (`training.train_regions` on random images, timed by its progress reports; see
`train_predict.train_timing`): the loop over regions that `deepalign train` runs on one device,
the vmapped formulation (``region_parallel: vmap``, all regions' nets stacked; what it runs over
several GPUs) for every `--train-impls` conv implementation (a `TrainConfig.conv_impl`, optionally
"+tf32" / "+bf16": run under that `jax.default_matmul_precision`), one region alone and the polar
trunk. Prediction: `inference.predict` with the stacked nets ("vmap", what "auto" picks on an
accelerator) at several chunk sizes, and the loop; `--predict-variants` time the vmapped forward
at a fixed chunk without predict's memory cap, optionally with other convolutions in layers 2…
Compilation is timed apart (first call / first epoch) and excluded from the rates. Every section
runs in its own process, killed after `--section-timeout` s, and none starts after `--budget` s;
each is written to the JSON as soon as it ends, and one that fails or hangs records that instead
of stopping the run (the device lease is 15 minutes, and the first run lost 7 of them to one stuck
convolution). Random images, random nets: speed only (accuracy is the CPU benchmarks' and the
tests' business).
"""

from __future__ import annotations

from deepalign_cli.runtime import configure_process

configure_process()  # before JAX starts

import argparse  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import best_seconds, matmul_flops, write_result, xla_cost  # noqa: E402
from train_predict import (  # noqa: E402
    jax_one_net_predict_rate,
    jax_predict_rate,
    predict_flops_per_image,
    train_step_flops,
    train_timing,
)

from deepalign_cli.config import TrainConfig  # noqa: E402
from deepalign_cli.core import cnn, inference, training  # noqa: E402

PRECISIONS = {"tf32": "tensorfloat32", "bf16": "bfloat16"}
TRAIN_IMAGES = 2048  # random labelled images the timed training runs sample from


def train_regions_rate(box: int, n_regions: int, n_steps: int, cfg: TrainConfig, region_parallel: str, impl: str = "auto") -> dict:
    """image-steps/s of n_regions per-region nets trained together by `train_regions`
    (`region_parallel` "loop" or "vmap"), first epoch (compilation) apart, best of two timed epochs.
    impl: a `TrainConfig.conv_impl`, optionally "+tf32" or "+bf16" (run under that
    `jax.default_matmul_precision`: convolutions and matmuls in that input precision)."""
    conv_impl, _, precision = impl.partition("+")
    if precision:
        with jax.default_matmul_precision(PRECISIONS[precision]):
            return {**train_regions_rate(box, n_regions, n_steps, cfg, region_parallel, conv_impl), "precision": precision}
    r = train_timing(box, n_steps, cfg, n_regions, region_parallel=region_parallel, conv_impl=conv_impl, timed_epochs=2,
                     n_images=TRAIN_IMAGES)
    kernels = cnn.kernel_sizes(box, cfg.kernel_fractions)
    return {"impl": impl, "conv_impls": list(cnn.conv_impls_for(kernels, conv_impl)), "regions": n_regions, "steps": n_steps, **r,
            "ms_per_step": 1e3 * min(r["epoch_s"]) / n_steps}


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
        loss = lambda x, w: jnp.sum(cnn.conv2d_direct(x, w) ** 2)  # noqa: E731
        grouped = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))
        flat = jax.jit(jax.grad(loss, argnums=(0, 1)))
        xf = x.reshape((-1,) + x.shape[2:])
        res[f"layer{i}"] = {"kernel": k, "cin": cin, "cout": cout, "size": size,
                            "grouped_ms": 1e3 * best_seconds(grouped, x, w, reps=reps),
                            "one_conv_ms": 1e3 * best_seconds(flat, xf, w[0], reps=reps)}
        size //= 2
    return res


def stacked_forward(spec: str, box: int, n_regions: int, cfg: TrainConfig):
    """(model, stacked random variables, jitted forward (stacked, images (B, N, N)) -> (B, R)
    logits) of a prediction spec "vmap[/TAIL]": every net's eval-mode forward vmapped over the
    stacked nets, the model's "auto" convolutions, or with TAIL the implementation of layers 2…
    ("fft", "direct", or one per layer "fft,direct")."""
    name, _, tail = spec.partition("/")
    if name != "vmap":
        raise ValueError(f"prediction spec {spec!r}: expected vmap[/TAIL]")
    model = cnn.build(cnn.architecture(cfg, box, 1), "auto")
    if tail:
        tails = tail.split(",") if "," in tail else [tail] * (len(model.conv_impls) - 1)
        model = model.clone(conv_impls=(model.conv_impls[0], *tails))
    stacked = inference.stack_region_variables(training.init_region_params(jax.random.key(0), cfg, box, n_regions))
    f = jax.vmap(lambda v, x: model.apply(v, x[..., None], train=False)[:, 0], in_axes=(0, None))
    return model, stacked, jax.jit(lambda v, x: f(v, x).T)


def predict_variant(box: int, n: int, cfg: TrainConfig, spec: str, bs: int, n_regions: int) -> dict:
    """particle·region/s of the vmapped forward of `spec` (see `stacked_forward`) at a fixed chunk
    of `bs` images (`inference.chunked_logits`, no memory cap)."""
    model, stacked, fn = stacked_forward(spec, box, n_regions, cfg)
    images = np.random.default_rng(1).standard_normal((n, box, box)).astype(np.float32)
    t = time.perf_counter()
    ref = inference.chunked_logits(fn, stacked, images[:bs], bs)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = inference.chunked_logits(fn, stacked, images, bs)
    dt = time.perf_counter() - t
    return {"particle_regions_per_s": n * n_regions / dt, "first_call_s": first, "conv_impls": list(model.conv_impls),
            "finite": bool(np.isfinite(out).all()), "logit_scale": float(np.abs(ref).mean())}


def profile_predict(box: int, n_regions: int, bs: int, cfg: TrainConfig, trace_dir: Path, reps: int = 5, spec: str = "vmap") -> dict:
    """Where the vmapped prediction's time goes: the device compiler's own cost analysis of the
    program (FLOP, bytes accessed) and a `jax.profiler` trace of `reps` calls on one chunk of `bs`
    images, summarised by op/kernel name (total µs per call, top 25, from the trace's Perfetto
    JSON; the full trace stays in `trace_dir` for TensorBoard/Perfetto). spec: as `stacked_forward`."""
    model, stacked, fn = stacked_forward(spec, box, n_regions, cfg)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((bs, box, box)).astype(np.float32))
    cost = xla_cost(fn, stacked, x)
    per_call = best_seconds(fn, stacked, x, reps=reps)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(fn(stacked, x))
    totals: collections.Counter = collections.Counter()
    for path in sorted(trace_dir.glob("**/*perfetto_trace.json.gz"), key=lambda q: q.stat().st_mtime)[-1:]:  # this run's
        data = json.load(gzip.open(path))
        for e in data["traceEvents"] if isinstance(data, dict) else data:
            if e.get("ph") == "X" and not e["name"].startswith("$"):  # "$file:line": Python frames
                totals[e["name"][:120]] += float(e.get("dur", 0.0)) / reps
    return {"conv_impls": list(model.conv_impls), "chunk": bs, "seconds_per_call": per_call,
            "particle_regions_per_s": bs * n_regions / per_call, "device_cost_analysis": cost,
            "implied_TB_per_s": cost["bytes"] / per_call / 1e12,
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
    n = a.matmul_size
    todo = {"matmul_tflops": lambda: {
        "size": n, "f32_default": matmul_flops(n) / 1e12, "f32_highest": matmul_flops(n, precision=jax.lax.Precision.HIGHEST) / 1e12,
        "bf16": matmul_flops(n, "bfloat16") / 1e12}}
    for bi, box in enumerate(a.boxes):
        first = bi == 0
        if "flops" not in a.skip:
            todo[f"flops_{box}"] = lambda box=box: _cpu_flops(box, cfg)
        if first and a.conv_layers:
            todo[f"conv_layers_{box}"] = lambda box=box: conv_layers(box, a.regions, cfg)
        if "train_loop" not in a.skip:
            todo[f"train_loop_{box}"] = lambda box=box: train_regions_rate(box, a.regions, a.steps, cfg, "loop")
        for impl in a.train_impls if first else a.train_impls[:1]:
            todo[f"train_vmap_{box}_{impl}"] = lambda box=box, impl=impl: train_regions_rate(box, a.regions, a.steps, cfg, "vmap", impl)
        if "one_region" not in a.skip:
            todo[f"train_one_region_{box}"] = lambda box=box: train_regions_rate(box, 1, a.steps * 4, cfg, "loop")
        if "polar" not in a.skip:  # one rotation-invariant net with a head per region (model: polar_trunk)
            todo[f"train_polar_trunk_{box}"] = lambda box=box: train_timing(box, a.steps * 4, cfg, model="polar_trunk",
                                                                            n_images=TRAIN_IMAGES)
            todo[f"predict_polar_trunk_{box}"] = lambda box=box: {
                "particle_regions_per_s": jax_one_net_predict_rate(box, a.predict_n, cfg, "polar_trunk", a.predict_batches[-1])}
        for mode in a.predict_modes:
            for bs in a.predict_batches if first else a.predict_batches[1:2]:
                todo[f"predict_{mode}_{box}_b{bs}"] = lambda box=box, bs=bs, mode=mode: {
                    "particle_regions_per_s": jax_predict_rate(box, a.predict_n, cfg, mode, bs, a.regions)}
        for spec in a.predict_variants if first else []:
            for bs in a.variant_batches:
                todo[f"predict_variant_{box}_{spec}_b{bs}"] = lambda box=box, spec=spec, bs=bs: predict_variant(
                    box, a.predict_n, cfg, spec, bs, a.regions)
        for impl in a.one_region_impls if first else []:
            todo[f"train_one_region_{box}_{impl}"] = lambda box=box, impl=impl: train_regions_rate(box, 1, a.steps * 4, cfg, "loop", impl)
        if "loop" not in a.skip:
            todo[f"predict_loop_{box}"] = lambda box=box: {
                "particle_regions_per_s": jax_predict_rate(box, a.predict_n // 4, cfg, "loop", 512, a.regions)}
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
CONV_IMPLS = ("auto", "direct", "fft", "s2d")  # `TrainConfig.conv_impl`


def _train_impl(text: str) -> str:
    impl, _, precision = text.partition("+")
    if impl not in CONV_IMPLS or (precision and precision not in PRECISIONS):
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(CONV_IMPLS)}, optionally +tf32 or +bf16")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--boxes", type=int, nargs="+", default=[120, 64])
    ap.add_argument("--regions", type=int, default=42)
    ap.add_argument("--steps", type=int, default=4, help="training steps per timed epoch")
    ap.add_argument("--train-impls", nargs="*", type=_train_impl, default=["auto"],
                    help="vmapped training with these conv_impl values (optionally +tf32 / +bf16) for the first box; "
                         "the other boxes time the first only")
    ap.add_argument("--predict-n", type=int, default=8192)
    ap.add_argument("--predict-batches", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--predict-modes", nargs="*", default=["vmap"], choices=inference.FORMULATIONS,
                    help="`inference.predict` region_parallel modes timed at --predict-batches (its memory cap applies)")
    ap.add_argument("--predict-variants", nargs="*", default=[],
                    help="vmapped forwards for the first box, at --variant-batches, without the memory cap: vmap[/TAIL], "
                         "TAIL the conv implementation of layers 2… (fft, direct, or per layer fft,direct)")
    ap.add_argument("--variant-batches", type=int, nargs="+", default=[256])
    ap.add_argument("--one-region-impls", nargs="*", type=_train_impl, default=[],
                    help="also train one region alone (ungrouped convolutions) with these conv_impl values")
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--conv-layers", action="store_true", help="time each conv layer grouped (vmapped) vs one conv")
    ap.add_argument("--skip", nargs="*", default=[], choices=["flops", "train_loop", "one_region", "polar", "loop"],
                    help="sections to skip")
    ap.add_argument("--profile", nargs="*", default=[],
                    help="profile these prediction specs (as --predict-variants; 'vmap' is predict's formulation) at the "
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
    out = {"device_kind": jax.devices()[0].device_kind, "argv": sys.argv[1:]}
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
        write_result("gpu", out, a.out)
    out["achieved"] = achieved(out, a.boxes, cfg)
    print("== achieved:", json.dumps(out["achieved"], default=float), flush=True)
    write_result("gpu", out, a.out)


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
