# Generated from effgen/config.py by `python -m effgen.config --make`: do not edit.
# Precedence: make VAR=... > the environment > these defaults (?=).
# root of every default output (make: W)
W ?= $(if $(EFFGEN_WORKDIR),$(EFFGEN_WORKDIR),build)
# training shard directory
TRAIN_DATA ?= $(W)/data/train
# validation shard directory
VALIDATION_DATA ?= $(W)/data/validation
# test shard directory
TEST_DATA ?= $(W)/data/test
# trained model (.keras)
OUTPUT_MODEL ?= $(W)/model/model.keras
# fitted preprocessing (pickled ColumnTransformer)
OUTPUT_PREPROCESSING ?= $(W)/model/tX.pkl
# rows of the synthetic sample (4M: 2M training rows for the default recipe)
N_PARTICLES ?= 4000000
# seed of synth, preprocess (split, quantiles) and train
SEED ?= 42
# training recipe (effgen/training/recipes.py): default, or seed (the notebook's)
RECIPE ?= default
# Keras backend of effgen train: jax or tensorflow (empty: the recipe's, jax for default, tensorflow for seed)
TRAIN_BACKEND ?=
# rows per training batch (the seed notebook used 100000)
BATCH_SIZE ?=
# training batches per epoch
STEPS_PER_EPOCH ?=
# epochs per training phase at most
MAX_EPOCHS ?=
# first phase's time limit
PRE_TRAINING_TIME_LIMIT_SECONDS ?=
# last phase's time limit (a one-phase recipe's only limit)
FINE_TUNING_TIME_LIMIT_SECONDS ?=
# networks (seeds SEED+1, ...) whose mean probabilities the efficiency model learns in make's main job, 0 to 9; 0: it learns the labels (RECIPE=seed: always)
TEACHERS ?= 2
# epochs of each teacher (MAX_EPOCHS overrides)
TEACHER_MAX_EPOCHS ?= 15
# each teacher's time limit (FINE_TUNING_TIME_LIMIT_SECONDS overrides)
TEACHER_TIME_LIMIT_SECONDS ?= 220
# epochs of the efficiency model learning from teachers (MAX_EPOCHS overrides)
STUDENT_MAX_EPOCHS ?= 10
# its time limit (FINE_TUNING_TIME_LIMIT_SECONDS overrides)
STUDENT_TIME_LIMIT_SECONDS ?= 150
# acceptance model's training time limit in make's main job (its recipe's last phase)
ACCEPTANCE_TIME_LIMIT_SECONDS ?= 45
# stages of make's main job run side by side (make -j) at most
MAIN_JOBS ?= 3
# trained resolution generator for tracking.so: a directory with model.keras, tX.pkl, tY.pkl (empty: none)
RESOLUTION ?=
# trained covariance generator for tracking.so, same layout (empty: none)
COVARIANCE ?=
# code generator: effgen, or scikinc (the reference route)
BACKEND ?= effgen
# exported function name of the library
SYMBOL ?= efficiency
# C compiler of the library
ifeq ($(origin CC),default)
CC := gcc
endif
# extra compiler flags, e.g. -march=native (empty: portable, dispatch inside the .so)
ARCH_FLAGS ?=
# compiler flags of the library (make, parity's production build, bench)
LIB_CFLAGS := -std=c99 -O3 -fPIC -Wall -Wextra -Werror
# link flags of the library (full RELRO)
LIB_LDFLAGS := -shared -Wl,-z,relro,-z,now
