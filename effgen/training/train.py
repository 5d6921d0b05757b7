"""`effgen train`: train the efficiency model by a recipe, resumable after a crash.

A recipe (effgen/training/recipes.py, `--recipe`) is a sequence of phases. The `seed`
recipe is the notebook's: phase 1 ("pretraining") uses a high learning rate and a little
label smoothing; phase 2 ("finetuning") a lower rate and no smoothing, so the outputs
keep a probabilistic meaning. The `default` recipe is one Adam phase with a cosine
schedule. Each phase stops at early stopping, at its time limit (checked at epoch end)
or at the maximum number of epochs, and ends on its best weights.

Nothing is lost on a crash: a run directory beside the model (`<model>.checkpoints/`)
holds, per phase, the last and the best model (with optimizer state) and `state.json`
(epochs done, per-epoch history, which phase finished). `--resume` continues from
there; the directory is removed once the final model is written.
"""

import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from effgen.atomic import atomic_file, atomic_outputs, atomic_path, exclusive_lock
from effgen.errors import EffgenError, TrainingError
from effgen.provenance import sha256_of
from effgen.training.backend import BACKENDS, activate, describe_device
from effgen.training.calibrate import calibrate_model
from effgen.training.distill import load_teachers, mean_probabilities
from effgen.training.feed import memory_batches, stream_batches
from effgen.training.recipes import RECIPES, SEED, Recipe, get_recipe

STATE_FORMAT = 2

# The seed notebook's phases (kept under this name for callers of run_phases).
PHASES = SEED.phases


# ---- callbacks (Keras is imported only when one is first asked for) ------------------

_CLASSES = {}


def _callback_classes():
    if _CLASSES:
        return _CLASSES
    import keras

    class TimeLimitCallback(keras.callbacks.Callback):
        """Stop training at the end of the first epoch that finishes after `limit_s`
        seconds (`already_s` counts time spent before a resume), like the seed's."""

        def __init__(self, limit_s, already_s=0.0):
            super().__init__()
            self.limit_s = float(limit_s)
            self.already_s = float(already_s)
            self.fired = False
            self.elapsed_s = self.already_s

        def on_train_begin(self, logs=None):
            self._start = time.monotonic()
            self.fired = False

        def on_epoch_end(self, epoch, logs=None):
            self.elapsed_s = self.already_s + time.monotonic() - self._start
            if self.elapsed_s > self.limit_s:
                self.model.stop_training = True
                self.fired = True
                print(f"\nTraining stopped after {self.elapsed_s:.2f}s (limit: {self.limit_s:g}s)",
                      flush=True)

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping whose counters can be restored from a previous, interrupted fit."""

        def __init__(self, *args, resume_from=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.resume_from = resume_from

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if self.resume_from is not None:
                self.best = self.resume_from["best"]
                self.best_epoch = self.resume_from["best_epoch"]
                self.wait = self.resume_from["wait"]
                self.best_weights = self.resume_from["best_weights"]

    class PhaseRecorder(keras.callbacks.Callback):
        """After every epoch: append it to the state, save the last (and, if it
        improved, the best) model, then write state.json. Runs after the stopping
        callbacks so it never saves a state they are about to change."""

        def __init__(self, run, phase, already_s):
            super().__init__()
            self.run, self.phase, self.already_s = run, phase, already_s

        def on_train_begin(self, logs=None):
            self._start = time.monotonic()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch_start = time.monotonic()
            self._epoch_cpu = time.process_time()
            self._steps = 0

        def on_train_batch_end(self, batch, logs=None):
            # `batch` is the last step of the execution (several with steps_per_execution).
            self._steps = batch + 1

        def on_epoch_end(self, epoch, logs=None):
            now = time.monotonic()
            logs = logs or {}
            record = {
                "epoch": epoch + 1,
                "loss": _finite_or_none(logs.get("loss")),
                "val_loss": _finite_or_none(logs.get("val_loss")),
                "wall_s": round(now - self._epoch_start, 4),
                # CPU seconds of the whole process (all its threads) in the epoch.
                "cpu_s": round(time.process_time() - self._epoch_cpu, 4),
                "elapsed_s": round(self.already_s + now - self._start, 4),
                "steps": self._steps,
                "learning_rate": float(self.model.optimizer.learning_rate.numpy()),
            }
            ph = self.run.state["phases"][self.phase.name]
            improved = record["val_loss"] is not None and (
                ph["best_val_loss"] is None or record["val_loss"] < ph["best_val_loss"])
            ph["epochs"].append(record)
            ph["elapsed_s"] = record["elapsed_s"]
            self.run.save_model(self.model, self.phase, "last")
            if improved:
                ph["best_val_loss"], ph["best_epoch"] = record["val_loss"], record["epoch"]
                self.run.save_model(self.model, self.phase, "best")
            self.run.write_state()

    class ScheduleCallback(keras.callbacks.Callback):
        """Set the phase's learning rate before every batch from its progress =
        max(steps done / step budget, seconds used / time limit): on a slow machine the
        schedule still reaches its floor by the time limit."""

        def __init__(self, phase, total_steps, steps_done, limit_s, already_s, clock=time.monotonic):
            super().__init__()
            self.clock = clock
            self.phase, self.total_steps = phase, max(int(total_steps), 1)
            self.steps, self.limit_s, self.already_s = int(steps_done), float(limit_s), float(already_s)
            self.by_time = False
            self._last_batch = -1

        def on_epoch_begin(self, epoch, logs=None):
            self._last_batch = -1

        def on_train_begin(self, logs=None):
            self._start = self.clock()

        def progress(self):
            by_steps = self.steps / self.total_steps
            by_time = (self.already_s + self.clock() - self._start) / self.limit_s \
                if self.limit_s > 0 else 1.0
            self.by_time = self.by_time or by_time > by_steps
            return max(by_steps, by_time)

        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.learning_rate = self.phase.learning_rate_at(self.progress())

        def on_train_batch_end(self, batch, logs=None):
            # With steps_per_execution > 1 one call ends several steps; `batch` is the last.
            self.steps += batch - self._last_batch
            self._last_batch = batch
            # Out of time: the rate is at its floor; end the epoch here rather than run
            # the rest of it past the limit (the time limit then ends the phase).
            if self.progress() >= 1.0 and self.by_time:
                self.model.stop_training = True

    class EMAWeights(keras.callbacks.Callback):
        """With an optimizer that keeps an average of the weights (`use_ema`): put the
        averaged weights into the model from validation until the next epoch begins, so
        val_loss, early stopping's best weights and both checkpoints are the average's.
        Must come first among the callbacks. While swapped, the optimizer's average slots
        hold the raw weights: a checkpoint thus stores both, and `swap_ema` undoes the
        swap after a resume. Training itself always steps the raw weights.

        The momentum warms up, min(momentum, (1 + t) / (10 + t)) at step t, as in
        TensorFlow's ExponentialMovingAverage(num_updates): a run of a few hundred steps
        averages its own later steps instead of staying near its first weights. The
        optimizer does that inside the step (`warm_up_ema`); this callback only swaps."""

        def __init__(self, momentum):
            super().__init__()
            self.momentum = float(momentum)
            self.swapped = False

        def _swap_in(self):
            if not self.swapped:
                swap_ema(self.model)
                self.swapped = True

        def on_test_begin(self, logs=None):
            self._swap_in()

        def on_epoch_end(self, epoch, logs=None):
            self._swap_in()  # also when the epoch had no validation

        def on_epoch_begin(self, epoch, logs=None):
            if self.swapped:
                swap_ema(self.model)
                self.swapped = False

    _CLASSES.update(TimeLimitCallback=TimeLimitCallback,
                    ResumableEarlyStopping=ResumableEarlyStopping,
                    PhaseRecorder=PhaseRecorder, ScheduleCallback=ScheduleCallback,
                    EMAWeights=EMAWeights)
    return _CLASSES


def __getattr__(name):
    # `from effgen.training.train import TimeLimitCallback` works without importing Keras
    # when this module is merely imported (e.g. by `effgen --help`).
    if name in ("TimeLimitCallback", "ResumableEarlyStopping", "PhaseRecorder", "ScheduleCallback",
                "EMAWeights"):
        return _callback_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ema_momentum_at(momentum, step):
    """The EMA's momentum at optimizer step `step` (see EMAWeights)."""
    return min(float(momentum), (1.0 + step) / (10.0 + step))


def warm_up_ema(model, momentum):
    """Make the model's optimizer warm its EMA momentum up inside the training step, at
    every step, from its own step count (see EMAWeights): on TensorFlow and JAX alike, no
    per-batch callback, nothing in the saved optimizer (its config keeps the plain
    `momentum`). Call after compiling and after loading a checkpoint."""
    import types

    from keras import ops

    opt = model.optimizer

    def update(self, trainable_variables):
        # Keras' own update (BaseOptimizer._update_model_variables_moving_average) with
        # min(momentum, (1 + t) / (10 + t)) for its fixed momentum; t = steps done before
        # this one, and the first step copies the weights (momentum 0), as Keras does.
        t = ops.cast(self.iterations, "float32")
        warm = ops.minimum(float(momentum), (1.0 + t) / (10.0 + t))
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                m = ops.multiply(ops.cast(ops.not_equal(self.iterations, 0), var.dtype),
                                 ops.cast(warm, var.dtype))
                average.assign(ops.add(ops.multiply(m, average), ops.multiply(ops.subtract(1, m), var)))

    # On the instance, past Keras' attribute tracking: both backends' apply steps call it.
    object.__setattr__(opt, "_update_model_variables_moving_average", types.MethodType(update, opt))


def swap_ema(model):
    """Exchange the model's trainable weights with its optimizer's moving averages of them
    (Keras keeps those in `_model_variables_moving_average`, in the order of
    `_trainable_variables`, as its own SwapEMAWeights callback assumes)."""
    import numpy as np
    opt = model.optimizer
    averages = getattr(opt, "_model_variables_moving_average", None)
    if not getattr(opt, "use_ema", False) or averages is None:
        raise TrainingError("swap_ema: the model's optimizer keeps no moving average (use_ema)")
    for var, avg in zip(opt._trainable_variables, averages, strict=True):
        raw = np.array(var.numpy())
        var.assign(avg)
        avg.assign(raw)


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ---- the run directory -----------------------------------------------------------------

def checkpoint_dir(output_model) -> Path:
    output_model = Path(output_model)
    return output_model.with_name(output_model.stem + ".checkpoints")


class RunDir:
    """state.json plus `<phase>-{last,best}.keras` in one directory."""

    def __init__(self, path, fingerprint, phases=PHASES):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.state = {
            "format": STATE_FORMAT,
            "fingerprint": fingerprint,
            "phases": {p.name: {"done": False, "stop_reason": None, "epochs": [],
                                "elapsed_s": 0.0, "best_epoch": None, "best_val_loss": None,
                                "resumed_at_epochs": []}
                       for p in phases},
        }

    @property
    def state_path(self):
        return self.path / "state.json"

    def model_path(self, phase, which):
        return self.path / f"{phase.name}-{which}.keras"

    def save_model(self, model, phase, which):
        with atomic_path(self.model_path(phase, which)) as tmp:
            model.save(tmp)

    def load_model(self, phase, which):
        import keras
        path = self.model_path(phase, which)
        if not path.exists():
            raise FileNotFoundError(f"cannot resume: {path} is missing (state.json says it exists)")
        return keras.models.load_model(path)

    def write_state(self):
        with atomic_file(self.state_path, "w") as f:
            json.dump(self.state, f, indent=1)

    def try_resume(self):
        """Load a previous state if it belongs to the same run; return why not otherwise."""
        if not self.state_path.exists():
            return f"no previous run in {self.path}"
        try:
            old = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as err:
            return f"{self.state_path} is unreadable ({err})"
        if old.get("format") != STATE_FORMAT:
            return f"{self.state_path} has format {old.get('format')!r}, expected {STATE_FORMAT}"
        if old.get("fingerprint") != self.fingerprint:
            changed = sorted(k for k in set(old.get("fingerprint", {})) | set(self.fingerprint)
                             if old.get("fingerprint", {}).get(k) != self.fingerprint.get(k))
            return f"{self.state_path} is from a different run (changed: {', '.join(changed)})"
        self.state = old
        return None

    def clear(self):
        shutil.rmtree(self.path, ignore_errors=True)


# ---- the two phases --------------------------------------------------------------------

def make_optimizer(phase, learning_rate=None):
    import keras
    rate = phase.learning_rate if learning_rate is None else learning_rate
    # Keras' EMA starts the average at the first step's weights (no bias correction needed).
    ema = {"use_ema": True, "ema_momentum": phase.ema_momentum} if phase.ema_momentum else {}
    if phase.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(rate, **ema)
    if phase.optimizer == "adam":
        return keras.optimizers.Adam(rate, **ema)
    return keras.optimizers.AdamW(rate, weight_decay=phase.weight_decay, **ema)


def steps_per_execution(recipe):
    """The recipe's steps per call, lowered to divide its epochs (Keras would otherwise round
    every epoch up to a whole number of calls)."""
    return math.gcd(int(recipe.steps_per_execution), int(recipe.steps_per_epoch))


def _compile(model, phase, recipe=SEED):
    import keras
    losses = {"categorical": keras.losses.CategoricalCrossentropy,
              "binary": keras.losses.BinaryCrossentropy}
    model.compile(loss=losses[phase.loss](label_smoothing=phase.label_smoothing),
                  optimizer=make_optimizer(phase, phase.learning_rate_at(0.0)),
                  steps_per_execution=steps_per_execution(recipe),
                  jit_compile=recipe.jit_compile)


def _resume_early_stopping(run, phase, epochs):
    """Early-stopping counters as they were after the last recorded epoch."""
    ph = run.state["phases"][phase.name]
    if ph["best_epoch"] is None:
        return None
    return {
        "best": ph["best_val_loss"],
        "best_epoch": ph["best_epoch"] - 1,
        "wait": len(epochs) - ph["best_epoch"],
        "best_weights": run.load_model(phase, "best").get_weights(),
    }


def run_phases(build, make_train_data, validation_data, run, *, recipe=SEED, steps_per_epoch=None,
               max_epochs=None, limits=None, verbose=2):
    """Run (or continue) the recipe's phases; return the model on the last phase's best
    weights.

    build() -> an uncompiled fresh model; make_train_data(phase_index, epochs_done) ->
    an endless stream of batches (a tf.data dataset, or a generator of numpy batches);
    validation_data: a one-batch dataset, or (x, y) arrays validated as one batch; run is
    a RunDir; steps_per_epoch / max_epochs / limits
    (each phase's seconds) override the recipe's."""
    cls = _callback_classes()
    recipe = recipe.with_overrides(steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)
    steps_per_epoch = recipe.steps_per_epoch
    if limits is None:
        limits = [p.time_limit_s for p in recipe.phases]
    phases = recipe.phases
    model = None
    for index, (phase, limit_s) in enumerate(zip(phases, limits)):
        max_epochs = recipe.phase_max_epochs(phase)
        ph = run.state["phases"][phase.name]
        epochs = ph["epochs"]
        if ph["done"]:
            print(f"== {phase.name}: already finished after {len(epochs)} epochs "
                  f"({ph['stop_reason']}); skipping", flush=True)
            model = None  # the next phase starts from this phase's best, loaded below
            continue
        if epochs:
            print(f"== {phase.name}: resuming after epoch {len(epochs)} "
                  f"({ph['elapsed_s']:.1f}s of {limit_s:g}s used)", flush=True)
            ph["resumed_at_epochs"].append(len(epochs))
            model = run.load_model(phase, "last")  # compiled, optimizer state included
            if phase.ema_momentum:
                swap_ema(model)  # the checkpoint holds the average in the model (EMAWeights)
                warm_up_ema(model, phase.ema_momentum)
            resume_es = _resume_early_stopping(run, phase, epochs)
        else:
            if model is None:
                model = _load_phase_result(run, phases[index - 1]) if index else build()
            _compile(model, phase, recipe)
            if phase.ema_momentum:
                warm_up_ema(model, phase.ema_momentum)
            resume_es = None
            print(f"== {phase.name}: {phase.optimizer}, {phase.schedule} learning rate "
                  f"{phase.learning_rate:g}, label smoothing "
                  f"{phase.label_smoothing:g}, patience {phase.patience}, limit {limit_s:g}s, "
                  f"{max_epochs} x {steps_per_epoch} steps, {model.count_params():,} parameters",
                  flush=True)

        # No patience: never stop early, but still end on the best epoch's weights.
        patience = max_epochs + 1 if phase.patience is None else phase.patience
        early = cls["ResumableEarlyStopping"](monitor="val_loss", patience=patience,
                                              restore_best_weights=True, resume_from=resume_es)
        timer = cls["TimeLimitCallback"](limit_s, already_s=ph["elapsed_s"])
        recorder = cls["PhaseRecorder"](run, phase, already_s=ph["elapsed_s"])
        callbacks = [early, timer, recorder]
        if phase.ema_momentum:
            callbacks.insert(0, cls["EMAWeights"](phase.ema_momentum))
        if phase.schedule != "constant":
            callbacks.insert(0, cls["ScheduleCallback"](
                phase, max_epochs * steps_per_epoch, len(epochs) * steps_per_epoch, limit_s,
                ph["elapsed_s"]))
        stop_reason = _already_over(ph, patience, max_epochs, limit_s, resume_es)
        if stop_reason is None:
            # Arrays are validated in one batch, as a one-batch dataset is.
            one_batch = {"validation_batch_size": len(validation_data[0])} \
                if isinstance(validation_data, tuple) else {}
            model.fit(make_train_data(index, len(epochs)), initial_epoch=len(epochs),
                      epochs=max_epochs, steps_per_epoch=steps_per_epoch,
                      validation_data=validation_data, **one_batch,
                      callbacks=callbacks, verbose=verbose, shuffle=False)
            if early.stopped_epoch > 0:
                stop_reason = "early_stopping"
            elif timer.fired:
                stop_reason = "time_limit"
            else:
                stop_reason = "max_epochs"
        elif resume_es is not None:
            model.set_weights(resume_es["best_weights"])
        ph["done"], ph["stop_reason"] = True, stop_reason
        run.write_state()
        print(f"== {phase.name}: stopped by {stop_reason} after {len(epochs)} epochs, "
              f"{ph['elapsed_s']:.1f}s; best val_loss {ph['best_val_loss']} "
              f"at epoch {ph['best_epoch']}", flush=True)
    if model is None:  # everything was already done
        model = _load_phase_result(run, phases[-1])
    return model


def _load_phase_result(run, phase):
    """A finished phase's model: its best epoch, or its last one if no epoch had a
    finite val_loss."""
    which = "best" if run.state["phases"][phase.name]["best_epoch"] is not None else "last"
    return run.load_model(phase, which)


def _already_over(ph, patience, max_epochs, limit_s, resume_es):
    """Why an interrupted phase needs no more epochs, if it does not."""
    n = len(ph["epochs"])
    if n >= max_epochs:
        return "max_epochs"
    if n and ph["elapsed_s"] > limit_s:
        return "time_limit"
    if resume_es is not None and resume_es["wait"] >= patience:
        return "early_stopping"
    return None


# ---- outputs ---------------------------------------------------------------------------

def make_history(run, recipe, config, n_params):
    phases = []
    for phase in recipe.phases:
        ph = run.state["phases"][phase.name]
        phases.append({
            "name": phase.name, "optimizer": phase.optimizer, "schedule": phase.schedule,
            "label_smoothing": phase.label_smoothing,
            "learning_rate": phase.learning_rate, "patience": phase.patience,
            "limit_s": phase.time_limit_s, "max_epochs": recipe.phase_max_epochs(phase),
            **{k: ph[k] for k in ("stop_reason", "best_epoch", "best_val_loss", "elapsed_s",
                                  "resumed_at_epochs", "epochs")},
        })
    return {"config": config, "recipe": recipe.describe(), "n_params": n_params, "phases": phases,
            "wall_s": round(sum(p["elapsed_s"] for p in phases), 3)}


def plot_history(history, path):
    """Both phases' loss and val_loss on one log-scale plot, the phase boundary marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    offset = 0
    colors = {"loss": "tab:blue", "val_loss": "tab:orange"}
    for i, phase in enumerate(history["phases"]):
        xs = [offset + e["epoch"] for e in phase["epochs"]]
        for key, color in colors.items():
            ys = [e[key] if e[key] is not None and e[key] > 0 else float("nan")
                  for e in phase["epochs"]]
            ax.plot(xs, ys, "o-" if i else "s--", color=color, ms=3,
                    label=f"{key.replace('val_loss', 'validation').replace('loss', 'training')} "
                          f"({phase['name']})")
        offset += len(phase["epochs"])
        if i + 1 < len(history["phases"]):
            ax.axvline(offset + 0.5, color="grey", ls=":", label="phase boundary")
    ax.set_xlabel("epoch (both phases)")
    ax.set_ylabel("categorical cross-entropy (+ L2)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ---- the function API ------------------------------------------------------------------

# Above this many training rows (16 float32 each: 64 bytes a row) the data stream from
# the shards instead of being held in memory.
MAX_IN_MEMORY_ROWS = 40_000_000


def _data_fingerprint(reader):
    files = []
    for p in sorted(Path(f) for f in reader.data_files):
        st = p.stat()
        files.append([p.name, st.st_size, st.st_mtime_ns])
    return {"features": list(reader.features), "labels": list(reader.labels), "files": files}


def _calibrate(model, recipe, val_reader, verbose):
    """The recipe's calibration-in-the-large on the first calibration_rows rows of the
    validation split (shuffled by preprocess), in place; what was done, or None."""
    if recipe.calibration == "none":
        return None
    x, y = next(val_reader.iter_xy(min(recipe.calibration_rows, val_reader.n_rows)))
    done = calibrate_model(model, x, y, recipe.calibration)
    if verbose:
        offsets = " ".join(f"{v:+.4f}" for v in done["mean_prediction_minus_label_before"])
        print(f"== calibration ({recipe.calibration}) on {done['rows']:,} validation rows: "
              f"mean prediction - label fraction was {offsets}; log-loss "
              f"{done['log_loss_before']:.5f} -> {done['log_loss_after']:.5f}", flush=True)
    return done


TARGETS = ("efficiency", "acceptance")


def _target_parts(target):
    """(reader class, model builder, recipes) of a training target: the efficiency
    classifier, or the acceptance model (effgen/training/acceptance.py)."""
    if target == "efficiency":
        from effgen.data.reader import FeatherReader
        from effgen.training.network import build_model
        return FeatherReader, build_model, RECIPES
    if target == "acceptance":
        from effgen.training.acceptance import AcceptanceReader, build_acceptance_model
        from effgen.training.recipes import ACCEPTANCE_RECIPES
        return AcceptanceReader, build_acceptance_model, ACCEPTANCE_RECIPES
    raise ValueError(f"unknown training target {target!r}; choose one of {', '.join(TARGETS)}")


def resolve_recipe(recipe, target="efficiency", **overrides) -> Recipe:
    """A recipe (or its name, among the target's recipes) with the given values (None:
    the recipe's) put in."""
    if isinstance(recipe, str):
        recipes = _target_parts(target)[2]
        recipe = get_recipe(recipe) if recipes is RECIPES else recipes.get(recipe)
        if recipe is None:
            raise ValueError(f"unknown {target} recipe; choose one of {', '.join(recipes)}")
    recipe = recipe.with_overrides(**overrides)
    for name in ("batch_size", "steps_per_epoch", "max_epochs", "width", "blocks"):
        if int(getattr(recipe, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(recipe, name)}")
    if recipe.validation_rows is not None and recipe.validation_rows < 1:
        raise ValueError(f"validation_rows must be >= 1, got {recipe.validation_rows}")
    for phase in recipe.phases:
        if phase.time_limit_s < 0:
            raise ValueError(f"phase {phase.name}: time limit must be >= 0, got {phase.time_limit_s}")
    return recipe


def train(train_dir, validation_dir, output_model, *, recipe="default", batch_size=None,
          steps_per_epoch=None, max_epochs=None, pre_limit_s=None, ft_limit_s=None, width=None,
          blocks=None, seed=0, resume=False, verbose=2, target="efficiency",
          test_dir=None, backend=None, teachers=None) -> dict:
    """Train by `recipe` (a Recipe or its name; the other keywords, when not None,
    override its values) on the shards in `train_dir`, validating on `validation_dir`;
    write `output_model` (.keras), history.json and loss.png beside it, and return the
    history. `pre_limit_s` is the first phase's time limit, `ft_limit_s` the last's.
    `target` "acceptance" trains the acceptance model on the same shards (label: their
    `acceptance` column) and, given `test_dir`, writes its short check (acceptance.json).
    `backend` ("jax" or "tensorflow"; None: the recipe's) is the Keras backend; in a
    process that has already imported Keras, the backend it has (effgen/training/backend.py).
    `teachers`: .keras models whose mean probabilities replace the training labels
    (effgen/training/distill.py); validation and calibration keep the true labels."""
    output_model = Path(output_model)
    if output_model.suffix != ".keras":
        raise ValueError(f"output model {output_model} must end in .keras (Keras requires it)")
    recipe = resolve_recipe(recipe, target, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                            max_epochs=max_epochs, pre_limit_s=pre_limit_s, ft_limit_s=ft_limit_s,
                            width=width, blocks=blocks)
    batch_size = recipe.batch_size
    teachers = [Path(t) for t in teachers or []]
    if teachers and not recipe.in_memory:
        raise ValueError(f"--teachers: recipe {recipe.name} streams its training split; distillation "
                         "needs it in memory (a recipe with in_memory)")

    reader_class, build_network, _ = _target_parts(target)
    train_reader, val_reader = reader_class(train_dir), reader_class(validation_dir)
    if (list(train_reader.features), list(train_reader.labels)) != \
            (list(val_reader.features), list(val_reader.labels)):
        raise ValueError(f"{train_dir} and {validation_dir} name different features/labels")
    if train_reader.preprocessing_sha256 != val_reader.preprocessing_sha256:
        raise ValueError(f"{train_dir} and {validation_dir} were made by different "
                         f"preprocessings (tX.pkl sha256 {train_reader.preprocessing_sha256} vs "
                         f"{val_reader.preprocessing_sha256}): rerun `effgen preprocess`")
    # A NaN in a shard would only show up as a NaN loss minutes into training.
    for reader in (train_reader, val_reader):
        reader.validate(progress=verbose > 0)
    if teachers and train_reader.n_rows > MAX_IN_MEMORY_ROWS:
        raise ValueError(f"--teachers: {train_dir} has {train_reader.n_rows:,} rows, more than the "
                         f"{MAX_IN_MEMORY_ROWS:,} held in memory for distillation (make: TEACHERS=0)")
    if train_reader.n_rows < batch_size:
        raise ValueError(f"{train_dir} has {train_reader.n_rows} rows, fewer than one batch "
                         f"of {batch_size}: lower --batch-size")

    # Before Keras is imported (by anything below); part of the run's identity.
    recipe = replace(recipe, backend=activate(backend, recipe.backend))
    config = {"target": target, "recipe": recipe.name, "backend": recipe.backend,
              "width": recipe.width, "blocks": recipe.blocks,
              "batch_size": batch_size, "steps_per_epoch": recipe.steps_per_epoch, "seed": seed,
              "n_features": len(train_reader.features), "n_classes": len(train_reader.labels),
              "train_rows": train_reader.n_rows, "validation_rows": val_reader.n_rows}
    # The whole recipe, less the time limits and epoch caps (changing those resumes).
    recipe_key = recipe.describe()
    for ph in recipe_key["phases"]:
        del ph["time_limit_s"], ph["max_epochs"]
    del recipe_key["max_epochs"]
    teacher_models = None
    if teachers:
        teacher_models, digests = load_teachers(teachers, config["n_features"], config["n_classes"],
                                                train_reader.preprocessing_sha256)
        config["teachers"] = [{"path": str(t), "sha256": d} for t, d in zip(teachers, digests)]
    fingerprint = {"config": {k: config[k] for k in ("target", "width", "blocks", "batch_size",
                                                     "steps_per_epoch", "seed")},
                   "teachers": [t["sha256"] for t in config.get("teachers", [])],
                   "recipe": recipe_key,
                   "train": _data_fingerprint(train_reader),
                   "validation": _data_fingerprint(val_reader)}

    import keras

    run = RunDir(checkpoint_dir(output_model), fingerprint, recipe.phases)
    if resume:
        why_not = run.try_resume()
        if why_not:
            print(f"effgen train: starting afresh: {why_not}", file=sys.stderr, flush=True)
            run.clear()
    else:
        run.clear()
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_state()

    keras.utils.set_random_seed(seed)
    # Same code path on a GPU (the `gpu` extra installs the backend's CUDA build): Keras
    # places the model there by itself; the history records what was used.
    config["device"] = describe_device(recipe.backend)
    # The seed validates on one batch; other recipes on a fixed subset (the shards are
    # already shuffled by preprocess, so the first rows are a fair sample).
    val_rows = batch_size if recipe.validation_rows is None else recipe.validation_rows
    x_val, y_val = next(val_reader.iter_xy(min(val_rows, val_reader.n_rows)))
    config["validation_rows_used"] = int(x_val.shape[0])
    if recipe.backend == "tensorflow":
        import tensorflow as tf
        validation_data = tf.data.Dataset.from_tensors((x_val, y_val))
    else:
        validation_data = (x_val, y_val)

    in_memory = recipe.in_memory and train_reader.n_rows <= MAX_IN_MEMORY_ROWS
    if in_memory:
        x_train, y_train = next(train_reader.iter_xy(train_reader.n_rows))
        if teacher_models:
            start = time.monotonic()
            y_train = mean_probabilities(teacher_models, x_train)
            if verbose:
                print(f"effgen train: labels: the mean probabilities of {len(teacher_models)} teachers "
                      f"on {len(x_train):,} rows ({time.monotonic() - start:.1f}s)", flush=True)
    config["data"] = "memory" if in_memory else "stream"

    def make_train_data(phase_index, epochs_done):
        # A different shuffle per phase and per resume, reproducible from the seed.
        shuffle_seed = seed * 1_000_003 + phase_index * 10_007 + epochs_done
        if in_memory:
            return memory_batches(x_train, y_train, batch_size, shuffle_seed, recipe.backend)
        return stream_batches(train_reader, batch_size, shuffle_seed, recipe.backend)

    def build():
        return build_network(config["n_features"], config["n_classes"], recipe.width, recipe.blocks,
                             l2=recipe.l2, seed=seed)

    try:
        model = run_phases(build, make_train_data, validation_data, run, recipe=recipe,
                           verbose=verbose)
    except BaseException:
        print(f"effgen train: stopped early; the epochs done so far are kept in {run.path}: "
              "run again with --resume to continue", file=sys.stderr, flush=True)
        raise

    calibration = _calibrate(model, recipe, val_reader, verbose)
    history = make_history(run, recipe, config, model.count_params())
    if calibration is not None:
        history["calibration"] = calibration
    history["features"] = list(train_reader.features)
    history["labels"] = list(train_reader.labels)
    samples = sum(e["steps"] for p in history["phases"] for e in p["epochs"]) * batch_size
    history["samples_per_s"] = round(samples / max(history["wall_s"], 1e-9), 1)
    # Cores the training kept busy, and samples per CPU-second (steadier under load).
    epochs = [e for p in history["phases"] for e in p["epochs"]]
    cpu_s, wall_s = sum(e.get("cpu_s", 0.0) for e in epochs), sum(e["wall_s"] for e in epochs)
    history["cores_used"] = round(cpu_s / max(wall_s, 1e-9), 2)
    history["samples_per_cpu_s"] = round(samples / max(cpu_s, 1e-9), 1)
    # Provenance for `effgen export`: which tX.pkl made the training features, and which
    # model file this history belongs to.
    history["preprocessing_sha256"] = train_reader.preprocessing_sha256
    plot_history(history, output_model.with_name("loss.png"))
    with atomic_outputs() as staged:
        # Renamed in staging order: the model last, so its existence (make's target)
        # implies its history is there.
        history_tmp = staged.path(output_model.with_name("history.json"))
        model_tmp = staged.path(output_model)
        model.save(model_tmp)
        history["model_sha256"] = sha256_of(model_tmp)
        history_tmp.write_text(json.dumps(history, indent=1))
    run.clear()
    if target == "acceptance" and test_dir is not None:
        from effgen.training.acceptance import check_on_test_split
        history["acceptance_check"] = check_on_test_split(
            model, test_dir, output_model.with_name("acceptance.json"))
    print(f"effgen train: wrote {output_model} ({target}, recipe {recipe.name} on {config['device']} "
          f"with Keras on {recipe.backend}, "
          f"{model.count_params():,} "
          f"parameters, {history['wall_s']:.1f}s of training, {history['samples_per_s']:,.0f} "
          f"samples/s, {history['samples_per_cpu_s']:,.0f} per CPU-second, "
          f"{history['cores_used']:.2f} cores)", flush=True)
    return history


# ---- the CLI ---------------------------------------------------------------------------

def register(subparsers):
    from effgen.config import add_knob, default_paths, positive_int

    paths = default_paths()
    p = subparsers.add_parser(
        "train", help="train the efficiency model by a recipe (resumable)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, default="efficiency",
                   help="which model: the efficiency classifier, or the acceptance model "
                        "(binary, the shards' `acceptance` column; its own recipes of the same "
                        "names; default output <workdir>/acceptance/model.keras)")
    add_knob(p, "--recipe", "RECIPE", choices=sorted(RECIPES),
             help="training recipe (effgen/training/recipes.py): "
                  + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()).replace("%", "%%"))
    p.add_argument("--train-data", type=Path, default=paths["train"],
                   help="training shard directory (env TRAIN_DATA; default %(default)s)")
    p.add_argument("--validation-data", type=Path, default=paths["validation"],
                   help="validation shard directory (env VALIDATION_DATA; default %(default)s)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"output model, .keras (env OUTPUT_MODEL; default {paths['model']}; "
                        f"with --target acceptance {paths['acceptance_model']})")
    p.add_argument("--test-data", type=Path, default=None,
                   help="--target acceptance: score the model on this split after training "
                        "(log-loss vs the prior, calibration) into acceptance.json beside it")
    # Unset: the recipe's value (CLI > environment > the recipe).
    add_knob(p, "--batch-size", "BATCH_SIZE")
    add_knob(p, "--steps-per-epoch", "STEPS_PER_EPOCH")
    add_knob(p, "--max-epochs", "MAX_EPOCHS")
    add_knob(p, "--pre-limit", "PRE_TRAINING_TIME_LIMIT_SECONDS")
    add_knob(p, "--ft-limit", "FINE_TUNING_TIME_LIMIT_SECONDS")
    p.add_argument("--width", type=positive_int("--width"), default=None,
                   help="hidden units (default: the recipe's, 128)")
    p.add_argument("--blocks", type=positive_int("--blocks"), default=None,
                   help="residual blocks (default: the recipe's, 5)")
    add_knob(p, "--seed", "SEED")
    add_knob(p, "--backend", "TRAIN_BACKEND", choices=BACKENDS,
             help="Keras backend to train on (effgen/training/backend.py): jax (the default recipe's) "
                  "or tensorflow (the seed's); empty: the recipe's")
    p.add_argument("--teachers", type=Path, nargs="+", default=None, metavar="MODEL",
                   help="train on the mean of these models' probabilities instead of the labels "
                        "(distillation, effgen/training/distill.py; in-memory recipes)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its checkpoint directory")
    again.add_argument("--restart", action="store_true",
                       help="discard an interrupted run's checkpoints and start afresh")
    p.set_defaults(func=_main)


def _main(args):
    try:
        _run_cli(args)
    except (FileNotFoundError, ValueError) as err:  # DataError is a ValueError
        raise EffgenError(str(err)) from err
    return 0



def _run_cli(args):
    if args.output is None:
        from effgen.config import default_paths
        paths = default_paths()
        args.output = paths["acceptance_model" if args.target == "acceptance" else "model"]
    # One train per output at a time; an interrupted run is discarded only when asked.
    with exclusive_lock(args.output.with_name(f".{args.output.name}.lock"), f"{args.output}"):
        state = checkpoint_dir(args.output) / "state.json"
        if state.is_file() and not (args.resume or args.restart):
            raise TrainingError(f"{state.parent} holds an interrupted run: pass --resume to "
                                "continue it or --restart to discard it")
        _train_from_args(args)


def _train_from_args(args):
    train(args.train_data, args.validation_data, args.output, recipe=args.recipe,
          batch_size=args.batch_size,
          steps_per_epoch=args.steps_per_epoch, max_epochs=args.max_epochs,
          pre_limit_s=args.pre_limit, ft_limit_s=args.ft_limit, width=args.width,
          blocks=args.blocks, seed=args.seed, resume=args.resume, target=args.target,
          test_dir=args.test_data, backend=args.backend or None, teachers=args.teachers)
