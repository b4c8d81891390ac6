"""workflow/schemas/config/*.schema.json are exactly what `config_json_schemas()` generates."""

from __future__ import annotations

import json
from pathlib import Path

from mechflow.config import DEFAULT_SCHEMA_DIR, config_json_schemas

REGENERATE = "regenerate with `python -m mechflow.contracts.export`"


def test_every_config_schema_file_is_generated_and_in_sync():
    schemas = config_json_schemas()
    files = {p.name.removesuffix(".schema.json") for p in Path(DEFAULT_SCHEMA_DIR).glob("*.schema.json")}
    assert set(schemas) == files, f"groups without a generated schema or stale files; {REGENERATE}"
    for group, schema in schemas.items():
        text = (Path(DEFAULT_SCHEMA_DIR) / f"{group}.schema.json").read_text()
        assert text == json.dumps(schema, indent=2) + "\n", f"{group}.schema.json drifted; {REGENERATE}"


def test_every_group_of_the_default_config_has_a_schema():
    from mechflow.config import compose_config

    groups = {k for k, v in compose_config([]).items() if isinstance(v, dict)} - {"wandb"}  # wandb: a root key
    assert groups <= set(config_json_schemas())
