"""Stage configurations: pydantic models mirrored by the YAML files in `configs/`.

One model per stage, `extra="forbid"` so a mistyped key is an error. Defaults are the paper's
values. A YAML file holds one section per stage (`simulate:`, `label:`, `train:` …); CLI flags
override the file, and the file overrides the defaults:

    cfg = load_config(Path("configs/demo.yaml"))          # DeepAlignConfig
    train_cfg = override(cfg.train, epochs=3, seed=None)  # None values are ignored
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import DeepAlignError


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SimulateConfig(_Stage):
    """`deepalign simulate`: particles from a map with CTF, noise and known poses."""

    n_particles: int = Field(2000, gt=0, description="number of particles")
    box_px: int | None = Field(None, gt=7, description="output box (px); default: the map's box")
    pixel_size_ang: float | None = Field(None, gt=0, description="map voxel size override (Å); the shipped map is 5 Å")
    snr: float = Field(0.1, gt=0, description="signal variance / noise variance after CTF")
    noise_micrograph: str | None = Field(None, description="MRC micrograph whose crops (random position, k·90° turn, flip) are the "
                                         "noise, resampled to the particles' pixel size; default: white Gaussian noise")
    defocus_min_ang: float = Field(10000.0, gt=0, description="defocus range lower bound (Å)")
    defocus_max_ang: float = Field(25000.0, gt=0, description="defocus range upper bound (Å)")
    astigmatism_ang: float = Field(300.0, ge=0, description="max |defocusU - defocusV| (Å)")
    voltage_kv: float = Field(300.0, gt=0)
    cs_mm: float = Field(2.7, ge=0)
    amplitude_contrast: float = Field(0.1, ge=0, le=1)
    bfactor_ang2: float = Field(0.0, ge=0, description="CTF envelope B-factor (Å²)")
    max_shift_px: float = Field(3.0, ge=0, description="max |origin| per axis (px)")
    ctf: bool = True
    pre_aligned_fraction: float = Field(0.1, gt=0, le=1, description="fraction written to the pre-aligned subset STAR")
    symmetry: str = Field("C1", description="symmetry the poses are drawn in (poses are drawn over the full sphere)")
    seed: int = 0


class RegionConfig(_Stage):
    """How the sphere of projection directions is split into regions."""

    spacing_deg: float = Field(30.0, gt=0, le=90, description="distance between region centres (30° → 42, 20° → 92)")
    symmetry: str = Field("C1", description="RELION point group: C1, Cn, Dn, T, O, I1, I2")


class LabelConfig(_Stage):
    """`deepalign label`: region of every pre-aligned particle."""

    min_particles_per_region: int = Field(10, ge=0, description="warn below this many particles in a region")


class PreprocessConfig(_Stage):
    """Image preparation shared by train, predict and align."""

    target_resolution_ang: float | None = Field(None, gt=0, description="pixel becomes target/3 (paper); None keeps the input pixel")
    normalize: bool = True
    bg_radius_frac: float = Field(0.75, gt=0, le=1, description="background = outside this fraction of the half box")


class TrainConfig(_Stage):
    """`deepalign train`: one binary CNN per region (the paper's network by default)."""

    model: Literal["per_region", "polar_trunk"] = Field(
        "per_region",
        description="per_region: the paper's nets; polar_trunk: one rotation-invariant net on polar-resampled images, a head per "
        "region (fastest to the paper's accuracy on CPU, see benchmarks/RESULTS.md); chosen in core/models.py",
    )
    conv_filters: tuple[int, int, int] = (16, 32, 64)
    kernel_fractions: tuple[float, float, float] = (1 / 3, 1 / 10, 1 / 20)
    dense_units: int = 256
    dropout: float = Field(0.2, ge=0, lt=1)
    learning_rate: float = Field(2e-3, gt=0, description="Adam step size (paper: 0.002)")
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=1)
    images_per_region: int = Field(10000, gt=0, description="augmented images seen per region per epoch")
    max_shift_frac: float = Field(0.05, ge=0, lt=0.5, description="augmentation shift, fraction of the box")
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    early_stopping_patience: int = Field(3, ge=0, description="epochs without val-loss improvement; 0 disables")
    min_positives: int = Field(5, ge=0, description="regions with fewer positives are skipped (warning)")
    conv_impl: Literal["auto", "direct", "fft", "s2d"] = "auto"
    region_parallel: Literal["auto", "loop", "vmap"] = Field(
        "auto", description="regions one after another (loop, fastest on one CPU or GPU) or vmapped together; auto: loop on one device, vmap over several GPUs"
    )
    synthetic_fraction: float | None = Field(None, ge=0.0, le=1.0, description="share of every training batch made on the fly from "
                                             "the reference: projections at random poses with the data's CTFs, shifts and noise spectrum "
                                             "(core/synthetic.py), new ones every step; 0: labelled particles only; null: the model's "
                                             "default (core/models.py: polar_trunk 0.9, per_region 0)")
    synthetic_snr: float | None = Field(None, gt=0, description="SNR of the synthetic examples; default: measured on the labelled "
                                        "particles against the reference")
    seed: int = 0


class PredictConfig(_Stage):
    """`deepalign predict`: probabilities of every particle for every region."""

    top_k: int = Field(2, gt=0)
    cumulative_p: float | None = Field(None, gt=0, le=1, description="keep regions until their probability mass reaches p")
    coverage: float | None = Field(None, gt=0, lt=1, description="keep enough regions for the true one to be kept for this share of "
                                   "the labelled particles held out of training (calibrates cumulative_p)")
    batch_size: int = Field(512, gt=0)
    memory_budget_gb: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _one_rule(self):
        if self.cumulative_p is not None and self.coverage is not None:
            raise ValueError("give either cumulative_p or coverage, not both")
        return self


class AlignConfig(_Stage):
    """`deepalign align`: correlation search inside each particle's top-k regions."""

    angular_step_deg: float | None = Field(None, gt=0, description="gallery direction step; default from box/resolution")
    psi_step_deg: float | None = Field(None, gt=0, description="in-plane step; default = angular step")
    region_margin_deg: float = Field(5.0, ge=0, description="gallery extends this far past a region border")
    max_shift_px: float = Field(5.0, ge=0)
    refine: bool = True
    lowpass_resolution_ang: float | None = Field(None, gt=0, description="reference low-pass and score band (Å); default: a map with half maps is FSC-weighted over the band it supports, another is low-passed to the target resolution")
    memory_budget_gb: float = Field(4.0, gt=0)
    ctf: bool = True


class ReconstructConfig(_Stage):
    """`deepalign reconstruct`: Fourier reconstruction with Wiener CTF correction and half-set FSC."""

    wiener_constant: float = Field(0.1, gt=0, description="regularisation added to Σ CTF² (relative)")
    seed: int = 0


class RefineConfig(_Stage):
    """`deepalign refine`: gold-standard local refinement to the data's resolution (core/refinement.py)."""

    iterations: int = Field(8, gt=0, description="most iterations; it stops earlier when box, resolution and poses stop changing")
    join_resolution_ang: float = Field(40.0, gt=0, description="the two half sets share only what is coarser than this (Å)")
    particle_diameter_ang: float | None = Field(None, gt=0, description="Crowther's diameter for the angular step and the default "
                                                "mask; default: the box size in Å")
    shift_range_px: float = Field(2.0, ge=0, description="integer shifts searched around each origin (working px), then sub-pixel passes")
    initial_lowpass_ang: float = Field(30.0, gt=0, description="--reference is low-passed to this for the first iteration (Å)")
    global_passes: int = Field(1, ge=0, description="after the local iterations first converge, re-search every particle over the "
                               "whole asymmetric unit against its own half map (align's box, step and shifts), then go on locally; "
                               "this many times")
    ctf: bool = True
    memory_budget_gb: float = Field(4.0, gt=0)
    seed: int = Field(0, description="the random half split when the input has no rlnRandomSubset")


class ConsensusConfig(_Stage):
    """`deepalign consensus`: keep particles whose poses agree."""

    threshold_deg: float = Field(5.0, gt=0)
    mode: Literal["rotation", "direction"] = "rotation"


class DeepAlignConfig(_Stage):
    """A whole configuration file: one section per stage."""

    simulate: SimulateConfig = SimulateConfig()
    regions: RegionConfig = RegionConfig()
    label: LabelConfig = LabelConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    align: AlignConfig = AlignConfig()
    reconstruct: ReconstructConfig = ReconstructConfig()
    refine: RefineConfig = RefineConfig()
    consensus: ConsensusConfig = ConsensusConfig()


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def load_config(path: Path | None) -> DeepAlignConfig:
    """Read a YAML config (None → all defaults). Errors are one-line DeepAlignErrors."""
    if path is None:
        return DeepAlignConfig()
    path = Path(path)
    if not path.is_file():
        raise DeepAlignError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DeepAlignError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(data, dict):
        raise DeepAlignError(f"{path}: expected a mapping of stage sections (simulate:, train:, …)")
    try:
        return DeepAlignConfig.model_validate(data)
    except ValidationError as e:
        raise DeepAlignError(f"{path}: {_one_line(e)}")


def override(stage_model: _Stage, **flags):
    """Copy of a stage config with the non-None CLI flags applied (validated)."""
    values = {k: v for k, v in flags.items() if v is not None}
    try:
        return stage_model.model_validate({**stage_model.model_dump(), **values})
    except ValidationError as e:
        raise DeepAlignError(f"command-line options: {_one_line(e)}")


def to_yaml(cfg: DeepAlignConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
