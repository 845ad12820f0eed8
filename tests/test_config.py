"""Stage configs: YAML files in configs/ load into the pydantic models; bad keys are one-line errors."""

from pathlib import Path

import pytest
import yaml

from deepalign_cli.config import DeepAlignConfig, TrainConfig, load_config, override
from deepalign_cli.errors import DeepAlignError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), DeepAlignConfig)


def test_default_yaml_lists_every_key_with_its_default():
    data = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert data == DeepAlignConfig().model_dump(mode="json")


def test_paper_defaults():
    t = TrainConfig()
    assert (t.conv_filters, t.dense_units, t.dropout, t.epochs, t.batch_size) == ((16, 32, 64), 256, 0.2, 10, 128)


def test_mistyped_key_is_a_one_line_error(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(DeepAlignError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and "x.yaml" in msg and "train.epoch" in msg


def test_wrong_type_is_a_one_line_error(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  epochs: many\n")
    with pytest.raises(DeepAlignError, match="train.epochs"):
        load_config(p)


def test_flags_override_file_values_and_none_is_ignored(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  epochs: 3\n  batch_size: 64\n")
    cfg = load_config(p)
    t = override(cfg.train, epochs=5, batch_size=None)
    assert (t.epochs, t.batch_size) == (5, 64)
    with pytest.raises(DeepAlignError, match="epochs"):
        override(cfg.train, epochs=0)


def test_missing_config_file_names_the_file(tmp_path):
    with pytest.raises(DeepAlignError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
