# effgen: `make lamarr-lib` runs the main job, `make test` the tests.
# Every target sets up .venv first; stages whose outputs are up to date are skipped.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
EFFGEN      := $(VENV)/bin/effgen
STAMP       := $(VENV)/.installed-stamp
W           ?= build
export EFFGEN_WORKDIR := $(W)

# Main-job knobs (see README).
N_PARTICLES ?= 2000000
SEED        ?= 42
BACKEND     ?= effgen
SYMBOL      ?= efficiency
# Target selection for the compiled library: empty = portable x86-64 baseline with
# runtime AVX2/FMA dispatch inside the .so; e.g. ARCH_FLAGS=-march=native to specialise.
ARCH_FLAGS  ?=
CC          ?= gcc
CFLAGS_LIB  := -std=c99 -O3 -fPIC -shared -Wall -Wextra -Werror $(ARCH_FLAGS)

SAMPLE      := $(W)/data/sample.feather
TRAIN_DIR   := $(W)/data/train
MODEL       := $(W)/model/model.keras
TX          := $(W)/model/tX.pkl
REPORT      := $(W)/validation/metrics.json
LAMARR      := $(W)/lamarr
LIB         := $(LAMARR)/$(SYMBOL).so
LIB_SRC     := $(LAMARR)/$(SYMBOL).c

.PHONY: setup test lamarr-lib data train validate export parity bench check-hard clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# ---- the main job -----------------------------------------------------------------
$(SAMPLE): | $(STAMP)
	$(EFFGEN) synth --n $(N_PARTICLES) --seed $(SEED) --output $@

$(TRAIN_DIR)/definitions.json $(TX): $(SAMPLE)
	$(EFFGEN) preprocess --input $(SAMPLE) --output-dir $(W)/data --preprocessing $(TX) --seed $(SEED) --force

$(MODEL): $(TRAIN_DIR)/definitions.json $(TX)
	$(EFFGEN) train --resume

$(REPORT): $(MODEL)
	$(EFFGEN) validate

$(LIB_SRC): $(MODEL) $(TX)
	$(EFFGEN) export --backend $(BACKEND) --symbol $(SYMBOL) --output-dir $(LAMARR)

$(LIB): $(LIB_SRC)
	$(CC) $(CFLAGS_LIB) -o $@.tmp $< -lm && mv $@.tmp $@

data: $(TRAIN_DIR)/definitions.json
train: $(MODEL)
validate: $(REPORT)
export: $(LIB_SRC)

lamarr-lib: $(REPORT) $(LIB)
	$(EFFGEN) export --describe $(LIB)

parity: $(LIB)
	$(EFFGEN) parity --library $(LIB)

bench: $(STAMP)
	$(EFFGEN) bench

clean:
	rm -rf $(W)

distclean: clean
	rm -rf $(VENV) *.egg-info
