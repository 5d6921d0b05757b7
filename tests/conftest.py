"""Shared data fixtures. Treat their outputs as read-only: copy before mutating."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# SQLamarr must load before TensorFlow: TF bundles its own SQLite, which would otherwise
# serve SQLamarr's calls (it lacks log10/sqrt) when both live in one pytest process.
import pytest  # noqa: E402
import SQLamarr  # noqa: E402,F401

TINY_ROWS = 20_000
TINY_SEED = 3
TINY_SHARD_ROWS = 4_000  # several shards per split, to exercise shard handling


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 20k-row synthetic tuple (ROOT, TrackingTupler/sim), preprocessed and split.

    Returns {"sample", "features", "train", "test", "validation", "preprocessing", "root"}
    paths plus "rows" ({split: row count}) and "seed". "features" is a feather file of the
    sample's raw features, pid, labels and truth as preprocess derives them (synth.generate)."""
    import pyarrow as pa
    import pyarrow.feather as feather

    from effgen.data import preprocess, synth

    root = tmp_path_factory.mktemp("tiny_dataset")
    sample = root / "sample.root"
    synth.write_sample(sample, TINY_ROWS, TINY_SEED, progress=False)
    features = root / "features.feather"
    feather.write_feather(pa.Table.from_batches(list(synth.generate(TINY_ROWS, TINY_SEED))), features)
    out = preprocess.preprocess(sample, root / "data", root / "model" / "tX.pkl", TINY_SEED,
                                shard_rows=TINY_SHARD_ROWS, progress=False)
    return {"sample": sample, "features": features, "train": out["train"], "test": out["test"],
            "validation": out["validation"], "preprocessing": out["preprocessing"],
            "root": root, "rows": out["rows"], "seed": TINY_SEED}
