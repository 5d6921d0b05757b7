# effgen: `make lamarr-lib` runs the main job, `make test` the tests.
# Every target sets up .venv first; stages whose outputs are up to date are skipped.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
EFFGEN      := $(VENV)/bin/effgen
STAMP       := $(VENV)/.installed-stamp
SELF        := $(firstword $(MAKEFILE_LIST))

# Every knob's default (W, N_PARTICLES, SEED, BATCH_SIZE, ..., the library's compiler
# flags) comes from effgen/config.py's table, through this generated file. Precedence:
# make VAR=... > the environment > the table. The recipes pass every knob explicitly.
include $(dir $(SELF))defaults.mk
export EFFGEN_WORKDIR := $(W)

# ---- paths the recipes hand to the shell must be plain ----------------------------------
# A space or a shell character in W would make `rm -rf $(W)` delete other directories;
# refused here rather than quoted, since make's own target names cannot hold spaces either.
SAFE_CHARS := a b c d e f g h i j k l m n o p q r s t u v w x y z \
              A B C D E F G H I J K L M N O P Q R S T U V W X Y Z \
              0 1 2 3 4 5 6 7 8 9 . _ - + / @
_strip_safe = $(if $(2),$(call _strip_safe,$(subst $(firstword $(2)),,$(1)),$(wordlist 2,$(words $(2)),$(2))),$(1))
_unsafe = $(or $(filter-out 1,$(words $(1))),$(call _strip_safe,$(1),$(SAFE_CHARS)))
# A one-digit whole number (TEACHERS).
_one_digit = $(and $(filter 1,$(words $(1))),$(filter 0 1 2 3 4 5 6 7 8 9,$(1)))
PATH_VARS := W OUTPUT_MODEL OUTPUT_PREPROCESSING TRAIN_DATA VALIDATION_DATA TEST_DATA SYMBOL BACKEND
$(foreach v,$(PATH_VARS),$(if $(call _unsafe,$($(v))),$(error effgen: $(v)='$($(v))' is empty or holds a space or a shell character; use letters, digits and ._-+/@ only)))
$(foreach d,/ . .. ./ ../,$(if $(filter $(d),$(W)),$(error effgen: W=$(W) would put the work directory over something else; choose a directory of its own)))
# Trained generators for tracking.so (RESOLUTION, COVARIANCE; defaults.mk), optional
# (empty: the library holds acceptance and efficiency only).
GENERATORS := RESOLUTION COVARIANCE
$(foreach v,$(GENERATORS),$(if $($(v)),$(if $(call _unsafe,$($(v))),$(error effgen: $(v)='$($(v))' holds a space or a shell character; use letters, digits and ._-+/@ only))))

# The main job writes its shards under $(W)/data (preprocess splits one sample there):
# data directories pointing elsewhere are refused, not silently ignored. OUTPUT_MODEL
# and OUTPUT_PREPROCESSING are honoured (train, validate, export use them).
MAIN_GOALS := data train baseline validate export lamarr-lib parity tracking
_check_data = $(if $(filter-out $(abspath $(W)/data/$(2)),$(abspath $($(1)_DATA))),\
  $(error effgen: $(1)_DATA=$($(1)_DATA) is set, but the main job writes its $(2) shards to $(W)/data/$(2); unset it (or set W to its work directory), or run the effgen stages yourself))
ifneq ($(filter $(MAIN_GOALS),$(MAKECMDGOALS)),)
$(call _check_data,TRAIN,train)
$(call _check_data,VALIDATION,validation)
$(call _check_data,TEST,test)
# A generator directory must hold what its export needs, said before hours of work.
$(foreach v,$(GENERATORS),$(if $($(v)),$(foreach f,model.keras tX.pkl tY.pkl,$(if $(wildcard $($(v))/$(f)),,\
  $(error effgen: $(v)=$($(v)) holds no $(f) (a generator directory holds model.keras, tX.pkl and tY.pkl))))))
# The teachers' seeds are SEED+1, ... by shell arithmetic: digits only, no leading zero
# (which the shell would read as octal).
$(if $(call _one_digit,$(TEACHERS)),,$(error effgen: TEACHERS='$(TEACHERS)' must be a whole number from 0 to 9))
$(if $(and $(filter-out 0,$(TEACHERS)),$(or $(filter 0%,$(filter-out 0,$(SEED))),$(call _strip_safe,$(SEED),0 1 2 3 4 5 6 7 8 9),$(if $(SEED),,x))),\
  $(error effgen: SEED='$(SEED)' must be written in plain digits (no sign, point, exponent or leading zero) when TEACHERS > 0))
endif

CFLAGS_LIB  = $(LIB_CFLAGS) $(ARCH_FLAGS) $(LIB_LDFLAGS)
# The flags as the manifest records them: no quote or backslash can break its JSON (or
# the shell quoting below).
MANIFEST_FLAGS = $(strip $(subst ',,$(subst ",,$(subst \,/,$(CFLAGS_LIB)))))

SAMPLE      := $(W)/data/sample.root
TRAIN_DIR   := $(W)/data/train
VAL_DIR     := $(W)/data/validation
TEST_DIR    := $(W)/data/test
MODEL       := $(OUTPUT_MODEL)
TX          := $(OUTPUT_PREPROCESSING)
REPORT      := $(W)/validation/metrics.json
BASELINE    := $(W)/baseline/predictions.npz
LAMARR      := $(W)/lamarr
LIB         := $(LAMARR)/$(SYMBOL).so
LIB_SRC     := $(LAMARR)/$(SYMBOL).c
# The acceptance model (same shards, same tX.pkl) and the tracking library: acceptance,
# efficiency and the generators given, exported from one spec into their own folder.
ACC_MODEL   := $(W)/acceptance/model.keras
TRACKING    := $(LAMARR)/tracking.so
TRACKING_DIR := $(LAMARR)/tracking
TRACKING_SPEC := $(TRACKING_DIR)/tracking.toml
GEN_FILES   := $(foreach v,$(GENERATORS),$(if $($(v)),$(addprefix $($(v))/,model.keras tX.pkl tY.pkl)))

.PHONY: setup test lamarr-lib data train baseline validate export parity tracking bench check-hard clean distclean FORCE

setup: $(STAMP)

# Under a lock, re-checked inside it: two first runs must not pip-install into one venv at once.
# uv installs the packages (the same index and versions as pip) in parallel: ~60 CPU-s
# instead of pip's ~100 here, a minute of the main job's 10 on 2 cores. Bytecode is
# compiled at install, so no run pays for it (nor fails to cache it, read-only or with
# PYTHONDONTWRITEBYTECODE).
$(STAMP): pyproject.toml
	@flock $(VENV).lock sh -c '[ $@ -nt pyproject.toml ] || { \
	    set -ex; $(PYTHON) -m venv $(VENV) && \
	    $(VENV)/bin/pip install -q --upgrade pip uv && \
	    $(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --compile-bytecode \
	        -e ".[test,bench]" && touch $@; }'

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

# Distillation (issue 14, effgen/training/distill.py): TEACHERS networks of the recipe,
# seeds SEED+1, SEED+2, ..., trained side by side (one per job slot, each its own log), then
# the efficiency model trained on the mean of their probabilities: one network as close to
# the truth as their mean. TEACHER_*/STUDENT_* split the training's minutes between them;
# MAX_EPOCHS and FINE_TUNING_TIME_LIMIT_SECONDS, when set, override both. TEACHERS=0, or
# RECIPE=seed (the notebook's recipe, exactly), trains on the labels directly.
TEACHER_IDS := $(if $(filter seed,$(RECIPE)),,$(if $(call _one_digit,$(TEACHERS)),$(wordlist 1,$(TEACHERS),1 2 3 4 5 6 7 8 9)))
TEACHER_MODELS := $(foreach k,$(TEACHER_IDS),$(W)/teachers/$(k)/model.keras)
_train_knobs = $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
	    $(if $(STEPS_PER_EPOCH),--steps-per-epoch $(STEPS_PER_EPOCH)) \
	    $(if $(or $(MAX_EPOCHS),$(1)),--max-epochs $(or $(MAX_EPOCHS),$(1))) \
	    $(if $(PRE_TRAINING_TIME_LIMIT_SECONDS),--pre-limit $(PRE_TRAINING_TIME_LIMIT_SECONDS)) \
	    $(if $(or $(FINE_TUNING_TIME_LIMIT_SECONDS),$(2)),--ft-limit $(or $(FINE_TUNING_TIME_LIMIT_SECONDS),$(2)))

$(W)/teachers/%/model.keras: $(TRAIN_DIR)/definitions.json $(TX)
	@mkdir -p $(dir $@) && echo "effgen: teacher $* training; its log: $(dir $@)train.log"
	$(EFFGEN) train --resume --recipe $(RECIPE) --train-data $(TRAIN_DIR) \
	    --validation-data $(VAL_DIR) --output $@ --seed $$(($(SEED) + $*)) \
	    $(call _train_knobs,$(TEACHER_MAX_EPOCHS),$(TEACHER_TIME_LIMIT_SECONDS)) \
	    > $(dir $@)train.log 2>&1 || { tail -n 40 $(dir $@)train.log; exit 1; }
	@sed -n '/^effgen /s/^/[teacher $*] /p' $(dir $@)train.log

$(MODEL): $(TRAIN_DIR)/definitions.json $(TX) $(TEACHER_MODELS)
	$(EFFGEN) train --resume --recipe $(RECIPE) --train-data $(TRAIN_DIR) \
	    --validation-data $(VAL_DIR) --output $@ --seed $(SEED) \
	    $(if $(TEACHER_MODELS),--teachers $(TEACHER_MODELS) \
	    $(call _train_knobs,$(STUDENT_MAX_EPOCHS),$(STUDENT_TIME_LIMIT_SECONDS)),$(call _train_knobs))

# The gradient-boosted baseline, fitted on the training split while the network trains
# (one OpenMP thread when stages run side by side: spinning threads collapse on a full
# machine); its probabilities for the test rows that validate scores.
$(BASELINE): $(TRAIN_DIR)/definitions.json
	$(EFFGEN) baseline --train-data $(TRAIN_DIR) --data $(TEST_DIR) --output $@ --seed $(SEED) \
	    --threads $(if $(filter 1,$(MAIN_JOBS)),auto,1)

# Scored on the test split (the validation split steered training), beside the baseline.
$(REPORT): $(MODEL) $(BASELINE)
	$(EFFGEN) validate --model $(MODEL) --preprocessing $(TX) --data $(TEST_DIR) \
	    --baseline $(BASELINE) --output-dir $(W)/validation

# Records the backend, so `make lamarr-lib BACKEND=scikinc` regenerates the source.
BACKEND_STAMP := $(LAMARR)/.backend
$(BACKEND_STAMP): FORCE
	@mkdir -p $(LAMARR)
	@echo '$(BACKEND) $(SYMBOL)' | cmp -s - $@ || echo '$(BACKEND) $(SYMBOL)' > $@
FORCE:

$(LIB_SRC): $(MODEL) $(TX) $(BACKEND_STAMP)
	$(EFFGEN) export --model $(MODEL) --preprocessing $(TX) --backend $(BACKEND) \
	    --symbol $(SYMBOL) --output-dir $(LAMARR)

# Records everything that reaches the compiler, the compiler's own version included:
# changing CC, ARCH_FLAGS or the table's flags rebuilds the library. Written with make's
# $(file) so that no flag passes through shell quoting.
FLAGS_STAMP := $(LAMARR)/.$(SYMBOL).build
BUILD_ID = $(CC) ($(shell $(CC) --version 2>/dev/null | head -n 1)) $(CFLAGS_LIB)
_differ = $(subst x$(1),,x$(2))$(subst x$(2),,x$(1))
$(LAMARR):
	@mkdir -p $@
$(FLAGS_STAMP): FORCE | $(LAMARR)
	@$(if $(DRY_RUN),:,$(if $(call _differ,$(file <$@),$(BUILD_ID)),$(file >$@,$(BUILD_ID)):,:))

# Built under a per-run name then renamed: a killed or failed build never leaves a
# half-written library where Lamarr would dlopen it.
$(LIB): $(LIB_SRC) $(FLAGS_STAMP)
	@# Remove what killed builds left (their shell is gone or a zombie), not a live one's.
	@for f in $@.tmp.*; do case "$$(ps -o stat= -p "$${f##*.}" 2>/dev/null)" in \
	    ""|Z*) rm -f "$$f";; esac; done
	$(CC) $(CFLAGS_LIB) -DEFFGEN_CFLAGS='"$(MANIFEST_FLAGS)"' -o $@.tmp.$$$$ $< -lm \
	    && mv -f $@.tmp.$$$$ $@ || { rm -f $@.tmp.$$$$; exit 1; }

# The acceptance model: same shards and tX.pkl as the efficiency, its own recipe of the
# same name, its own time limit (the budget of the main job), checked on the test split.
# It trains beside the efficiency model, so its epoch lines go to a log of their own
# (shown if it fails, its last lines when it ends).
ACC_LOG := $(W)/acceptance/train.log
$(ACC_MODEL): $(TRAIN_DIR)/definitions.json $(TX)
	@mkdir -p $(dir $@) && echo "effgen: acceptance training; its log: $(ACC_LOG)"
	$(EFFGEN) train --target acceptance --resume --recipe $(RECIPE) --train-data $(TRAIN_DIR) \
	    --validation-data $(VAL_DIR) --test-data $(TEST_DIR) --output $@ --seed $(SEED) \
	    --ft-limit $(ACCEPTANCE_TIME_LIMIT_SECONDS) \
	    $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
	    $(if $(STEPS_PER_EPOCH),--steps-per-epoch $(STEPS_PER_EPOCH)) \
	    $(if $(MAX_EPOCHS),--max-epochs $(MAX_EPOCHS)) \
	    $(if $(PRE_TRAINING_TIME_LIMIT_SECONDS),--pre-limit $(PRE_TRAINING_TIME_LIMIT_SECONDS)) \
	    > $(ACC_LOG) 2>&1 || { tail -n 40 $(ACC_LOG); exit 1; }
	@sed -n '/^effgen /s/^/[acceptance] /p' $(ACC_LOG)

# The spec lists the symbols of tracking.so; rewritten only when its text changes (a new
# RESOLUTION or COVARIANCE, another model path), so that make sees what changed.
_spec_entry = [[model]]\nsymbol = "$(1)"\nmodel = "$(abspath $(2))"\npreprocessing = "$(abspath $(3))"\n$(if $(4),postprocessing = "$(abspath $(4))"\n)
SPEC_TEXT = $(call _spec_entry,acceptance,$(ACC_MODEL),$(TX))$(call _spec_entry,efficiency,$(MODEL),$(TX))$(if $(RESOLUTION),$(call _spec_entry,resolution,$(RESOLUTION)/model.keras,$(RESOLUTION)/tX.pkl,$(RESOLUTION)/tY.pkl))$(if $(COVARIANCE),$(call _spec_entry,covariance,$(COVARIANCE)/model.keras,$(COVARIANCE)/tX.pkl,$(COVARIANCE)/tY.pkl))
$(TRACKING_SPEC): FORCE
	@mkdir -p $(TRACKING_DIR)
	@printf '$(SPEC_TEXT)' | cmp -s - $@ || printf '$(SPEC_TEXT)' > $@

# Exported and compiled by `effgen export --spec --compile` (the library's flags, as
# above), then copied beside efficiency.so under a per-run name and renamed.
# ARCH_FLAGS reaches the export through the environment (no shell quoting of flags).
$(TRACKING): export ARCH_FLAGS := $(ARCH_FLAGS)
$(TRACKING): $(TRACKING_SPEC) $(ACC_MODEL) $(MODEL) $(TX) $(GEN_FILES) $(FLAGS_STAMP) $(BACKEND_STAMP)
	$(EFFGEN) export --spec $(TRACKING_SPEC) --output-dir $(TRACKING_DIR) --compile \
	    --backend $(BACKEND) --cc $(CC)
	cp $(TRACKING_DIR)/tracking.so $@.tmp.$$$$ && mv -f $@.tmp.$$$$ $@ || { rm -f $@.tmp.$$$$; exit 1; }

# The main-job targets hold a lock on the work directory: concurrent runs on one $(W)
# queue instead of interleaving (the second then finds its outputs up to date). Inside,
# up to MAIN_JOBS stages run side by side, unless the command line chose its own -j.
LOCKED := data train baseline validate export lamarr-lib parity tracking
LOCK   := $(W)/.effgen.lock
DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))
JOBS     = $(if $(filter -j%,$(MAKEFLAGS)),,-j$(MAIN_JOBS))
ifndef EFFGEN_HOLDS_LOCK
$(LOCKED):
ifeq ($(DRY_RUN),)
	@mkdir -p $(W) && { flock -n $(LOCK) true || echo "effgen: waiting for the other run on $(W)"; } \
	    && EFFGEN_HOLDS_LOCK=1 flock $(LOCK) $(MAKE) -f $(SELF) --no-print-directory $(JOBS) $@
else
	@EFFGEN_HOLDS_LOCK=1 $(MAKE) -f $(SELF) --no-print-directory $(JOBS) $@
endif
else
data: $(TRAIN_DIR)/definitions.json
train: $(MODEL)
baseline: $(BASELINE)
validate: $(REPORT)
export: $(LIB_SRC)
tracking: $(TRACKING)

lamarr-lib: $(REPORT) $(LIB) $(TRACKING)
	$(EFFGEN) describe $(LIB) --model $(MODEL) --preprocessing $(TX) --validation $(VAL_DIR)

# The efficiency library on the validation split, then every symbol of tracking.so against
# Keras + scikit-learn on 200k rows drawn in each tX's range (generators: the same noise).
parity: $(LIB) $(TRACKING)
	$(EFFGEN) parity --library $(LIB) --symbol $(SYMBOL) --model $(MODEL) --preprocessing $(TX) \
	    --data $(VAL_DIR) --output-dir $(W)/parity
	$(EFFGEN) parity --spec $(TRACKING_SPEC) --library $(TRACKING) --rows 200000 \
	    --per-row-rows 20000 --output-dir $(W)/parity/tracking
endif

# The reliability tests at depth: many more fuzzed models (~3 min at 120 examples), the
# kill, concurrency, thread and sanitizer tests. `make test` runs them all at a smaller size.
FUZZ_EXAMPLES ?= 120
check-hard: $(STAMP)
	EFFGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -m "slow or make or sanitizer or lamarr" tests

bench: $(STAMP)
	$(EFFGEN) bench --output-dir $(W)/bench

# Removes W only if the main job made it (its lock file is there) or it is the default.
clean:
	@if [ -e $(W) ] && [ ! -e $(W)/.effgen.lock ] && [ "$(W)" != build ]; then \
	    echo "effgen: $(W) holds no .effgen.lock (not a work directory of make's main job): not removing it" >&2; \
	    exit 1; fi
	rm -rf $(W)

distclean: clean
	rm -rf $(VENV) *.egg-info

# `make print-VAR` shows a variable as make sees it (tests compare it with the table).
print-%:
	@:$(info $($*))
