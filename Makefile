# Everything a fresh machine needs: `make demo`, `make test`. Re-runs are fast once .venv exists.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch that lies on this machine's disk; an open spec would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo docs lint format bench gpu-check reliability clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# Azure's storage emulator for the az:// tests (tests/servers.py starts it): an npm package pinned by its lock file.
AZURITE := tests/azurite/node_modules/.bin/azurite-blob

$(AZURITE): tests/azurite/package.json tests/azurite/package-lock.json
	cd tests/azurite && npm ci --no-audit --no-fund --loglevel=error
	touch $(AZURITE)

test: $(STAMP) $(AZURITE)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The documentation site (mkdocs.yml, docs/) into site/; --strict: any warning fails the build.
# NO_MKDOCS_2_WARNING silences mkdocs-material's notice about MkDocs 2.0, which is not about these docs.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check fabric_ckpt tests examples benchmarks
	$(BIN)/ruff format --check fabric_ckpt tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix fabric_ckpt tests examples
	$(BIN)/ruff format fabric_ckpt tests examples

# Checkpoint speed and memory side by side with the disk, torch, Lightning Fabric and DCP (docs/performance.md).
# `make bench SIZE=3` (or BENCH_GIB=3) measures the 3 GiB headline checkpoint; the default is ~1 GiB.
BENCH_GIB ?= 1
SIZE ?= $(BENCH_GIB)
BENCH_STAMP := $(VENV)/.bench-installed

bench: $(STAMP)
	test $(BENCH_STAMP) -nt pyproject.toml || { \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[bench]" && touch $(BENCH_STAMP); }
	$(BIN)/python -m benchmarks --size-gib $(SIZE) --output bench-results.json --figures docs/images

# fabric_ckpt on a CUDA device in one short run (docs/performance.md, "GPU"): bitwise CUDA save/load straight into the
# live parameters, pinned staging reused, lazy snapshots exact, blocked times vs one device-to-host copy. Skipped
# cleanly (exit 0) without CUDA.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check --output gpu-check.json

# The reliability campaign (docs/reliability.md): hundreds of SIGKILLs mid-save, fuzzed, forged and malicious
# checkpoints, full disks; prints the figures (also kept in build/reliability-figures.jsonl). ~6 min on 2 cores.
RELIABILITY_FIGURES := build/reliability-figures.jsonl

reliability: $(STAMP) $(AZURITE)
	rm -f $(RELIABILITY_FIGURES)
	FABRIC_CKPT_CAMPAIGN=full FABRIC_CKPT_FIGURES=$(RELIABILITY_FIGURES) $(BIN)/python -m pytest -s -rxs \
		tests/test_crash.py tests/test_disk_full.py tests/test_hostile_input.py tests/test_hostile_formats.py \
		tests/test_fault_injection.py tests/test_tensor_kinds.py tests/test_partial_load.py \
		tests/test_partial_load_distributed.py tests/test_async_save.py tests/test_paths.py tests/test_dcp_errors.py \
		tests/test_preemption.py tests/test_shared_volumes.py tests/test_object_store_writers.py \
		tests/test_sharded_commit.py
	$(BIN)/python -m tests.reliability_figures $(RELIABILITY_FIGURES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build site *.egg-info
