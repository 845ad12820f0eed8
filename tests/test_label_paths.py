"""labels.star lives in PROJECT/label/: its image names must find the subset's stacks from there."""

import shutil

import numpy as np

from deepalign_cli.config import PreprocessConfig
from deepalign_cli.io import star
from deepalign_cli.particles import ParticleSource


def test_labels_find_stacks_inside_the_project_relatively_and_outside_it_absolutely(sim_project, run_cli, tmp_path):
    sim = sim_project / "simulated"
    # a subset kept elsewhere, RELION-style: its stack beside it, named relative to the STAR's folder
    outside = tmp_path / "elsewhere" / "Refine3D"
    outside.mkdir(parents=True)
    shutil.copy(sim / "particles.mrcs", outside / "stack.mrcs")
    subset = star.read_particles(sim / "subset.star")
    moved = subset.copy()
    moved.particles["rlnImageName"] = [n.replace("simulated/particles.mrcs", "stack.mrcs") for n in star.image_names(subset)]
    star.write_particles(outside / "subset.star", moved)

    run_cli("label", sim_project, "--subset", outside / "subset.star", check=True)
    labels = star.read_particles(sim_project / "label" / "labels.star")
    assert all(n.split("@", 1)[1] == str((outside / "stack.mrcs").resolve()) for n in star.image_names(labels))
    images = ParticleSource(labels, PreprocessConfig()).read(np.arange(3))
    np.testing.assert_array_equal(images, ParticleSource(subset, PreprocessConfig()).read(np.arange(3)))

    # the project's own subset: relative to PROJECT/label/, so the project folder can be moved whole
    run_cli("label", sim_project, "--subset", sim / "subset.star", "--force", check=True)
    labels = star.read_particles(sim_project / "label" / "labels.star")
    assert all(n.endswith("@../simulated/particles.mrcs") for n in star.image_names(labels))
    moved_project = tmp_path / "moved"
    shutil.move(str(sim_project), moved_project)
    labels = star.read_particles(moved_project / "label" / "labels.star")
    np.testing.assert_array_equal(ParticleSource(labels, PreprocessConfig()).read(np.arange(3)), images)
