"""Config files and JSON schemas of the sae / transcoder groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mechflow.dictionaries.config import SAEConfig, TranscoderConfig, json_schemas, parse_config
from mechflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def test_schemas_are_in_sync_with_the_models():
    for name, schema in json_schemas().items():
        path = ROOT / "workflow" / "schemas" / "config" / f"{name}.schema.json"
        assert json.loads(path.read_text()) == schema, "regenerate with python -m mechflow.contracts.export"


@pytest.mark.parametrize("group,model", [("sae", SAEConfig), ("transcoder", TranscoderConfig)])
def test_every_config_file_validates(group, model):
    import jsonschema

    schema = json_schemas()[group]
    files = sorted((ROOT / "config" / group).glob("*.yaml"))
    assert files
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        jsonschema.Draft202012Validator(schema).validate(cfg)
        parse_config(model, cfg, group)


def test_default_sae_config_is_the_requested_one():
    cfg = parse_config(SAEConfig, yaml.safe_load((ROOT / "config/sae/topk.yaml").read_text()), "sae")
    assert (cfg.hook, cfg.architecture, cfg.d_sae, cfg.k) == ("blocks.15.hook_resid_post", "topk", 4608, 32)


def test_bad_field_names_the_field():
    with pytest.raises(ConfigError, match=r"sae\.data\.batch_size"):
        parse_config(SAEConfig, {"data": {"batch_size": 0}}, "sae")
    with pytest.raises(ConfigError, match=r"sae\.archtecture"):
        parse_config(SAEConfig, {"archtecture": "topk"}, "sae")


def test_every_allowed_lr_scheduler_is_one_saelens_builds():
    """The config accepts exactly what SAELens' trainer can build (a name it rejects would only fail
    after the harvest, at the first training step)."""
    import typing

    from sae_lens.training.optim import get_lr_scheduler

    names = typing.get_args(SAEConfig.model_fields["lr_scheduler_name"].annotation)
    assert "constant" in names
    for name in names:
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        get_lr_scheduler(name, opt, training_steps=100, lr=1e-3, warm_up_steps=10, decay_steps=20, lr_end=1e-4,
                         num_cycles=1)
    with pytest.raises(ConfigError, match="lr_scheduler_name"):
        parse_config(SAEConfig, {"lr_scheduler_name": "linearwarmupdecay"}, "sae")
