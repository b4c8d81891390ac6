"""The schema-version policy of every file mechflow writes (one policy, one place).

* Every layout (JSON document or Parquet table) is defined once, in `mechflow.contracts`. Its
  version is the contract's, never the writer's: writers take it from here (`SCHEMA_VERSION`, or
  a document model's ``schema_version`` default) and readers check it by parsing through the
  contract, so no stage spells a version of its own.
* The current version of every contract is ``SCHEMA_VERSION = "1"``.
* JSON documents that carry a version have ``schema_version: Literal["1"]`` as their FIRST field
  (`mechflow.contracts.documents.VersionedDocument`); a file with another version fails to parse,
  with an error naming the file and the stage to re-run.
* Parquet files that carry a version store it in the footer (schema) metadata under
  ``SCHEMA_VERSION_KEY`` (activation shards, ``tokens.parquet``); ``edge_reference.parquet`` carries
  it inside its footer document (`mechflow.contracts.reference.EdgeReferenceDocument`).
* Files written before this policy without a version (several JSON documents, most Parquet
  tables: they are listed in `mechflow.contracts.catalog` with ``versioned=False``) are version
  "1" by definition: adding the field or footer key would change every existing output's bytes, so
  it is added with the first layout change, which writes ``"2"``.
* A change that an existing reader cannot read (a renamed, removed or retyped field/column; a
  new required field) bumps the version of THAT contract: change its ``Literal``, keep the old
  reader path only when old files must stay readable, and regenerate the schemas
  (``python -m mechflow.contracts.export``). Adding an optional field is not a bump.
"""

from __future__ import annotations

from typing import Literal

SCHEMA_VERSION = "1"
SchemaVersion = Literal["1"]
# Parquet footer (schema metadata) key of the version, where a table carries one.
SCHEMA_VERSION_KEY = b"mechflow.schema_version"
