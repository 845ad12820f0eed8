"""A/B of align's reference filter, mask and score band (benchmarks/RESULTS.md, "align: an
FSC-weighted reference" and "align: a masked reference"): the exhaustive search of a finished
benchmark project's particles against its labelled-subset reference, low-passed to the target
resolution (align before 2026-12-06), unfiltered to Nyquist, weighted by its half maps' FSC to
Nyquist, that times a soft sphere, that times the solvent mask made from it (align now:
`search_reference`), and the true map (the ceiling).

    W=/tmp/deepalign_refine_bench .venv/bin/python benchmarks/experiments/align_reference_filter.py 3000
    W=/tmp/acc_new/C1 .venv/bin/python benchmarks/experiments/align_reference_filter.py 1500 lp20,fscw_band_nyq,sphere,solvent,truth

W: a workdir of benchmarks/refine.py or benchmarks/accuracy.py (its da/ project, truth.star,
subset.star, truth_map.mrc). Args: particles (the first N), variant name filters. Writes
/tmp/exp/align_band_<W name>_<N>.json.
"""
import sys, time, json, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from pathlib import Path
from deepalign_cli.io.project import Project
from deepalign_cli.io import star
from deepalign_cli.particles import ParticleSource
from deepalign_cli.config import PreprocessConfig
from deepalign_cli.core import evaluation, gallery, mask, preprocess, projector, reconstruction, regions, symmetry
from deepalign_cli.core.alignment import align_particles
from deepalign_cli.commands._reconstruction import Reference, reference_at_working_geometry, search_reference

import os
W = Path(os.environ.get("W", "/tmp/deepalign_refine_bench"))
proj = Project.open(W / "da")
pre = PreprocessConfig.model_validate(proj.stage_config("preprocess"))
table = star.read_particles(proj.particles_star)
src = ParticleSource(table, pre)
pix, box = src.pixel_ang, src.box
print("working", box, pix)
truth = star.read_particles(W / "truth.star")
e_true, o_true = star.get_poses(truth)
held_names = set(star.image_names(star.read_particles(W / "subset.star")))
names = star.image_names(table)
tn = {n: i for i, n in enumerate(star.image_names(truth))}
it = np.array([tn[n] for n in names]); held = np.array([n not in held_names for n in names])
reg = proj.stage_config("regions") or {"symmetry": "C1", "spacing_deg": 30.0}
ops1 = symmetry.symmetry_operators(reg["symmetry"])
centres = regions.region_centres(reg["spacing_deg"], ops1)
al = proj.stage_config("align")
TGT = pre.target_resolution_ang
print(reg, al)
rows = np.arange(len(table))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
rows = rows[:N]
imgs = src.read(rows); ctf = src.ctf_params(rows)
refdir = W / "da/reconstruct/reference"
ref = reference_at_working_geometry(refdir / "map.mrc", box, pix)
h1 = reference_at_working_geometry(refdir / "half1.mrc", box, pix); h2 = reference_at_working_geometry(refdir / "half2.mrc", box, pix)
freqs, fsc = reconstruction.fsc(h1, h2)
print("ref fsc", np.round(fsc, 2))
tmap = reference_at_working_geometry(W / "truth_map.mrc", box, pix) if (W/"truth_map.mrc").exists() else None
def fscw(v):  # align's filter: each shell × sqrt(2·FSC/(1+FSC)) of the half maps (C_ref of the full map)
    return reconstruction.shell_filter(v, reconstruction.fsc_weights(fsc))
variants = {
  "lp20_band20 (before 2026-12-06)": (preprocess.lowpass_volume(ref, pix, TGT), TGT, 7.5),
  "raw_band_nyq": (ref, 2 * pix, 7.5),
  "fscw_band_nyq": (fscw(ref), 2 * pix, 7.5),
  "fscw_band_nyq_step5": (fscw(ref), 2 * pix, 5.0),
  "fscw_sphere_band_nyq": (fscw(ref) * mask.soft_sphere(box, 0.45 * box - 2, 2.0), 2 * pix, 7.5),
  "fscw_solvent_band_nyq (now)": (search_reference(Reference(ref, "subset", fsc), pix, gallery.search_geometry(box, pix), None)[0], 2 * pix, 7.5),
  "lp20_band20_step5": (preprocess.lowpass_volume(ref, pix, TGT), TGT, 5.0),
  "truth_band_nyq": (tmap, 2 * pix, 7.5),
}
sel = sys.argv[2].split(",") if len(sys.argv) > 2 else list(variants)
out = {}
for name, (vol, band, step) in variants.items():
    if not any(s in name for s in sel) or vol is None:
        continue
    t = time.perf_counter()
    vft = projector.prepare_volume(np.asarray(vol, np.float32))
    r = align_particles(imgs, vft, None, centres, ops1, pixel_size_ang=pix, angular_step_deg=step, psi_step_deg=step,
                        margin_deg=11.55, max_shift_px=al.get('max_shift_px', 3.0), ctf_params=ctf, refine=True, lowpass_resolution_ang=band,
                        exhaustive=True)
    dt = time.perf_counter() - t
    e = r["eulers_deg"]
    h = held[rows]
    d = evaluation.angular_error_summary(e[h], e_true[it[rows]][h], ops1)['errors_deg']
    out[name] = dict(le5=float(np.mean(d <= 5) * 100), le2=float(np.mean(d <= 2) * 100), med=float(np.median(d)), s=dt)
    print(name, {k: round(v, 2) for k, v in out[name].items()}, flush=True)
Path("/tmp/exp").mkdir(exist_ok=True)
json.dump(out, open(f"/tmp/exp/align_band_{W.name}_{N}.json", "w"), indent=1)
