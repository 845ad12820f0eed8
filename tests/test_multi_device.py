"""Several devices: the region axis (training, prediction) and the particle axis (alignment) split
over 4 forced CPU devices give the results of one device.

The device count is fixed when JAX initialises, so the same script runs in two fresh interpreters
at once: one with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and one without; each
saves its results to an .npz that the test compares. In the script, ``devices.shard_leading`` is
wrapped to record on how many devices every sharded argument really lies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepalign_cli.core import geometry

pytestmark = pytest.mark.slow  # a 4-device subprocess run: `make test-slow`

N_DEVICES = 4
TIMEOUT_S = 300
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "deepalign_cli" / "data" / "ribosome70S_65.mrc"

SCRIPT = r'''
import json, sys
import jax, mrcfile, numpy as np
from deepalign_cli.config import TrainConfig
from deepalign_cli.core import alignment, cnn, devices, geometry, inference, preprocess, projector, regions, simulate, symmetry, training

out_path, map_path = sys.argv[1], sys.argv[2]
sharded = []  # (axis name, number of devices of every leaf) of every multi-device placement
_shard_leading = devices.shard_leading
def spy(tree, mesh, axis_name=None):
    res = _shard_leading(tree, mesh, axis_name)
    if mesh is not None:
        sizes = sorted({len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(res)})
        sharded.append([axis_name, sizes])
    return res
devices.shard_leading = spy
res = {}

# (a) 5 regions (padded to 8 on 4 devices), tiny nets, 1 epoch, vmapped formulation
rng = np.random.default_rng(0)
images = rng.normal(size=(40, 16, 16)).astype(np.float32)
labels = np.arange(40) % 5
cfg = TrainConfig(conv_filters=(4, 4, 4), dense_units=8, batch_size=8, images_per_region=8, epochs=1,
                  early_stopping_patience=0, min_positives=3, region_parallel="vmap", validation_fraction=0.0)
# identical networks in both runs (initial variables): prediction alone must agree to rounding
init = training.init_region_params(jax.random.key(3), cfg, 16, 1)[0]  # one init (slow op by op), 5 variants
inits = [jax.tree_util.tree_map(lambda a, r=r: a * (1 + 0.2 * r), init) for r in range(5)]
arch = cnn.architecture(cfg, 16, 1)
init_models = {r: {**v, "arch": arch, "head": 0} for r, v in enumerate(inits)}
res["probs_init"] = inference.predict_probs(init_models, images, batch_size=16, region_parallel="vmap")
stacked = inference.stack_region_variables(inits, devices.region_mesh())
leaves = jax.tree_util.tree_leaves(stacked)
res["stacked_devices"] = np.array(sorted({len(x.sharding.device_set) for x in leaves}))
res["stacked_regions"] = np.array(leaves[0].shape[0])
models = training.train_regions(images, labels, range(5), cfg, jax.random.key(0))
res["train_loss"] = np.array([models[r]["history"][0]["train_loss"] for r in range(5)])
res["probs_trained"] = inference.predict_probs(models, images, batch_size=16, region_parallel="vmap")
# a device memory that holds one region's step: regions trained in groups (of 1 per device)
real_memory = devices.memory_bytes
devices.memory_bytes = lambda: int(1.5 * cfg.batch_size * 16 * 16 * cfg.conv_filters[0] * 32 / 0.8)
res["group_sizes"] = np.array([len(g) for g in training.vmap_region_groups(
    range(5), cfg.batch_size, 16, cfg.conv_filters[0], devices.memory_bytes(), devices.mesh_size(devices.region_mesh()))])
grouped = training.train_regions(images, labels, range(5), cfg, jax.random.key(0))
devices.memory_bytes = real_memory
res["train_loss_grouped"] = np.array([grouped[r]["history"][0]["train_loss"] for r in range(5)])

# (b) 10 particles at 24 px, restricted to 2 regions each (many small groups: padded pieces)
vol = preprocess.fourier_crop_volume(mrcfile.read(map_path).astype(np.float32), 24)
pixel = 5.0 * 65 / 24
sim = simulate.simulate_particles(jax.random.key(1), vol, 10, pixel, snr=float("inf"), max_shift_px=2.0)
ops = symmetry.symmetry_operators("C1")
centres = regions.region_centres(30.0, ops)
truth, _ = regions.assign_regions(geometry.eulers_to_matrices(sim["eulers_deg"])[:, 2, :], centres, ops)
candidates = np.stack([truth, (truth + 1 + np.arange(10) % 3) % len(centres)], axis=1)
ctf = {k: sim[k] for k in ("defocus_u_ang", "defocus_v_ang", "defocus_angle_deg")}
aligned = alignment.align_particles(
    sim["images"], projector.prepare_volume(vol), candidates, centres, ops, pixel_size_ang=pixel,
    angular_step_deg=15.0, psi_step_deg=15.0, margin_deg=5.0, max_shift_px=3.0,
    ctf_params=dict(ctf, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1))
res.update({"align_" + k: v for k, v in aligned.items() if k != "seconds"}, truth_eulers=sim["eulers_deg"])
# a budget too small for the reference table: references projected per group and chunk
tight = alignment.align_particles(
    sim["images"], projector.prepare_volume(vol), candidates, centres, ops, pixel_size_ang=pixel,
    angular_step_deg=15.0, psi_step_deg=15.0, margin_deg=5.0, max_shift_px=3.0, refine=False,
    memory_budget_gb=2e-4, ctf_params=dict(ctf, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1))
res.update({"tight_" + k: v for k, v in tight.items() if k != "seconds"})
res["device_count"] = np.array(jax.device_count())
res["sharded"] = np.array(json.dumps(sharded))
np.savez(out_path, **res)
'''


def _run_both(tmp_path: Path) -> tuple[dict, dict]:
    script = tmp_path / "multi_device_script.py"
    script.write_text(SCRIPT)
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base["JAX_PLATFORMS"] = "cpu"
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    envs = {1: {**base, "XLA_FLAGS": flags}, N_DEVICES: {**base, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={N_DEVICES} --xla_dump_to={tmp_path / 'hlo'}".strip()}}
    procs = {
        d: subprocess.Popen([sys.executable, str(script), str(tmp_path / f"out{d}.npz"), str(MAP)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d, env in envs.items()
    }
    for d, p in procs.items():
        _, err = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, f"{d}-device run failed:\n{err[-4000:]}"
    one, many = (dict(np.load(tmp_path / f"out{d}.npz")) for d in (1, N_DEVICES))
    # every program the sharded run compiled, by name, with its collective operations (if any)
    many["collectives"] = {
        f.name: sorted({op for op in COLLECTIVES if op in f.read_text()})
        for f in (tmp_path / "hlo").glob("*after_optimizations.txt")
    }
    return one, many


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run_both(tmp_path_factory.mktemp("multi_device"))


def test_work_is_really_sharded_over_four_devices(runs):
    one, four = runs
    assert int(one["device_count"]) == 1 and int(four["device_count"]) == N_DEVICES
    # one device: no mesh, nothing placed (the single-device path)
    assert json.loads(str(one["sharded"])) == [] and one["stacked_devices"].tolist() == [1]
    # stacked params: 5 regions padded to 8, every leaf over all 4 devices
    assert four["stacked_devices"].tolist() == [N_DEVICES] and int(four["stacked_regions"]) == 8
    placed = json.loads(str(four["sharded"]))
    axes = {a for a, _ in placed}
    assert axes == {"regions", "particles"}
    assert all(sizes == [N_DEVICES] for _, sizes in placed)


def test_sharded_programs_use_no_collectives(runs):
    """Every device works on its own slice: no program needs the others. A collective in an eager
    op (e.g. slicing a sharded array) deadlocked XLA:CPU's forced devices on a loaded 2-core CI
    machine ("Expected 4 threads to join the rendezvous"), and on GPUs it would be a needless sync."""
    _, four = runs
    compiled = four["collectives"]
    assert len(compiled) > 20  # the dump really holds the run's programs
    assert {name: ops for name, ops in compiled.items() if ops} == {}


def test_prediction_and_training_equal_one_device(runs):
    one, four = runs
    # same networks: the region-sharded forward equals the single-device one
    assert four["probs_init"].shape == (40, 5)
    np.testing.assert_allclose(four["probs_init"], one["probs_init"], atol=1e-5)
    # training: same losses; probabilities after training agree up to the rounding-order noise that
    # Adam amplifies on the conv biases in front of BatchNorm (see test_training's vmap-vs-loop test)
    np.testing.assert_allclose(four["train_loss"], one["train_loss"], rtol=1e-4)
    # trained in region groups that fit a (small) device memory: 5 groups of 1 on one device,
    # 2 groups of ≤ 4 (padded to 4) on four devices — the same losses
    assert one["group_sizes"].tolist() == [1] * 5 and four["group_sizes"].tolist() == [3, 2]
    np.testing.assert_allclose(one["train_loss_grouped"], one["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(four["train_loss_grouped"], one["train_loss"], rtol=1e-4)
    moved = np.max(np.abs(one["probs_trained"] - 0.5))
    assert np.max(np.abs(four["probs_trained"] - one["probs_trained"])) < 0.025 * moved


def test_alignment_poses_equal_one_device(runs):
    one, four = runs
    diff = geometry.rotation_distance_deg(geometry.eulers_to_matrices(four["align_eulers_deg"]),
                                          geometry.eulers_to_matrices(one["align_eulers_deg"]))
    assert np.max(np.asarray(diff)) < 1e-3
    for k in ("eulers_deg", "origins_px", "score"):  # coarse only, references projected on the fly
        np.testing.assert_allclose(four["tight_" + k], one["tight_" + k], atol=1e-4)
    np.testing.assert_allclose(four["align_origins_px"], one["align_origins_px"], atol=1e-4)
    np.testing.assert_allclose(four["align_score"], one["align_score"], atol=1e-5)
    np.testing.assert_array_equal(four["align_region"], one["align_region"])
    # and the poses are right (noise-free particles, 15° grid refined 3 times: ≤ √3·15/16 ≈ 1.6°)
    err = geometry.rotation_distance_deg(geometry.eulers_to_matrices(four["align_eulers_deg"]),
                                         geometry.eulers_to_matrices(four["truth_eulers"]))
    assert np.max(np.asarray(err)) < 2.0
