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
# 4M particles: 2M training rows, so the default recipe's ~30M samples are ~15 passes (issue 14).
N_PARTICLES ?= 4000000
SEED        ?= 42
# Training: the recipe (effgen/training/recipes.py: default or seed) sets batch size, epochs
# and time limits, sized so the main job takes at most ~10 minutes on 2 cores; the seed's
# env vars, when set, override them (a one-phase recipe's limit is the fine-tuning one).
RECIPE      ?= default
BATCH_SIZE  ?=
PRE_TRAINING_TIME_LIMIT_SECONDS ?=
FINE_TUNING_TIME_LIMIT_SECONDS  ?=
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

# Under a lock, re-checked inside it: two first runs must not pip-install into one venv at once.
$(STAMP): pyproject.toml
	@flock $(VENV).lock sh -c '[ $@ -nt pyproject.toml ] || { \
	    set -ex; $(PYTHON) -m venv $(VENV) && \
	    $(VENV)/bin/pip install -q --upgrade pip && \
	    $(VENV)/bin/pip install -q -e ".[test,bench]" && touch $@; }'

test: $(STAMP)
	$(VENV)/bin/ruff check effgen tests
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q tests

# ---- the main job -----------------------------------------------------------------
$(SAMPLE): | $(STAMP)
	$(EFFGEN) synth --n $(N_PARTICLES) --seed $(SEED) --output $@

# One run makes both (grouped target, GNU make >= 4.3).
$(TRAIN_DIR)/definitions.json $(TX) &: $(SAMPLE)
	$(EFFGEN) preprocess --input $(SAMPLE) --output-dir $(W)/data --preprocessing $(TX) --seed $(SEED) --force

$(MODEL): $(TRAIN_DIR)/definitions.json $(TX)
	$(EFFGEN) train --resume --recipe $(RECIPE) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
	    $(if $(PRE_TRAINING_TIME_LIMIT_SECONDS),--pre-limit $(PRE_TRAINING_TIME_LIMIT_SECONDS)) \
	    $(if $(FINE_TUNING_TIME_LIMIT_SECONDS),--ft-limit $(FINE_TUNING_TIME_LIMIT_SECONDS))

# Scored on the test split (the validation split steered training), beside the
# gradient-boosted baseline fitted on the training split.
$(REPORT): $(MODEL)
	$(EFFGEN) validate --data $(W)/data/test --baseline-train-data $(TRAIN_DIR)

# Records the backend, so `make lamarr-lib BACKEND=scikinc` regenerates the source.
BACKEND_STAMP := $(LAMARR)/.backend
$(BACKEND_STAMP): FORCE
	@mkdir -p $(LAMARR)
	@echo '$(BACKEND) $(SYMBOL)' | cmp -s - $@ || echo '$(BACKEND) $(SYMBOL)' > $@
FORCE:

$(LIB_SRC): $(MODEL) $(TX) $(BACKEND_STAMP)
	$(EFFGEN) export --backend $(BACKEND) --symbol $(SYMBOL) --output-dir $(LAMARR)

# Built under a per-run name then renamed: a killed or failed build never leaves a
# half-written library where Lamarr would dlopen it.
$(LIB): $(LIB_SRC)
	@# Remove what killed builds left (their shell is gone or a zombie), not a live one's.
	@for f in $@.tmp.*; do case "$$(ps -o stat= -p "$${f##*.}" 2>/dev/null)" in \
	    ""|Z*) rm -f "$$f";; esac; done
	$(CC) $(CFLAGS_LIB) -DEFFGEN_CFLAGS='"$(CFLAGS_LIB)"' -o $@.tmp.$$$$ $< -lm \
	    && mv -f $@.tmp.$$$$ $@ || { rm -f $@.tmp.$$$$; exit 1; }

# The main-job targets hold a lock on the work directory: concurrent runs on one $(W)
# queue instead of interleaving (the second then finds its outputs up to date).
LOCKED := data train validate export lamarr-lib parity
LOCK   := $(W)/.effgen.lock
SELF   := $(firstword $(MAKEFILE_LIST))
DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))
ifndef EFFGEN_HOLDS_LOCK
$(LOCKED):
ifeq ($(DRY_RUN),)
	@mkdir -p $(W) && { flock -n $(LOCK) true || echo "effgen: waiting for the other run on $(W)"; } \
	    && EFFGEN_HOLDS_LOCK=1 flock $(LOCK) $(MAKE) -f $(SELF) --no-print-directory $@
else
	@EFFGEN_HOLDS_LOCK=1 $(MAKE) -f $(SELF) --no-print-directory $@
endif
else
data: $(TRAIN_DIR)/definitions.json
train: $(MODEL)
validate: $(REPORT)
export: $(LIB_SRC)

lamarr-lib: $(REPORT) $(LIB)
	$(EFFGEN) describe $(LIB)

parity: $(LIB)
	$(EFFGEN) parity --library $(LIB)
endif

# The reliability tests at depth: many more fuzzed models (~3 min at 120 examples), the
# kill, concurrency, thread and sanitizer tests. `make test` runs them all at a smaller size.
FUZZ_EXAMPLES ?= 120
check-hard: $(STAMP)
	EFFGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_models.py \
	    tests/test_kill.py tests/test_makefile.py tests/test_threads.py tests/test_abi.py \
	    tests/test_parity.py

bench: $(STAMP)
	$(EFFGEN) bench

clean:
	rm -rf $(W)

distclean: clean
	rm -rf $(VENV) *.egg-info
