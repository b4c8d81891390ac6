"""Run-level documents: ``model_card.json`` and ``run_manifest.json``.

Also re-exports the harvest and task models that used to live here (import them from
`mechflow.contracts`). `workflow/schemas/contracts/*.schema.json` are generated from every
document model by `python -m mechflow.contracts.export`; a test fails when they drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mechflow.contracts.documents import VersionedDocument
from mechflow.contracts.harvest import HarvestManifest, ShardInfo
from mechflow.contracts.tasks import TaskExample

__all__ = ["HarvestManifest", "ModelCard", "RunManifest", "ShardInfo", "TaskExample"]


class ModelCard(VersionedDocument):
    """What was loaded: enough to recompute anything from the same weights."""

    name: str = Field(description="registry name, e.g. smollm2_135m, or a hub name")
    architecture: str
    n_layers: int
    n_heads: int
    n_key_value_heads: int | None = None
    d_model: int
    d_mlp: int
    d_vocab: int
    source: str = Field(description="where the weights came from (file path, model directory or hub id)")
    source_sha256: str | None = Field(None, description="sha256 of the weight file, when local (a model "
                                      "directory: one sha256 over each weight file's name and sha256)")
    dtype: str
    bos_token_id: int | None = None
    prepend_bos: bool
    backend: Literal["transformer_lens", "hf"] = Field(
        "transformer_lens", description="how the model ran: a TransformerLens HookedTransformer, or the Hugging "
        "Face model through forward hooks (mechflow.models.hf.HookedHF; docs/models.md)")
    hf_modules: dict[str, str] | None = Field(
        None, description="backend hf: the HF module paths the TL hook names map to (layers, mlp, embed, "
        "final_norm); null for transformer_lens")


class RunManifest(VersionedDocument):
    """`run_manifest.json`: what ran, on what, from which inputs."""

    run: str
    config_hash: str
    mechflow_version: str
    git_commit: str | None
    git_dirty: bool | None
    packages: dict[str, str]
    python: str
    platform: str
    model: ModelCard | None
    inputs: dict[str, str] = Field(description="input file -> sha256")
    outputs: dict[str, str] = Field(default_factory=dict, description="output file -> sha256")
    started_at: str
    finished_at: str
