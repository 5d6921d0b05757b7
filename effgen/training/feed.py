"""The training batches Keras' fit takes, per backend: endless streams of whole batches,
reshuffled on every pass, reproducible from a seed.

- TensorFlow: tf.data datasets (rows gathered inside TensorFlow).
- JAX: plain Python generators of numpy batches. Keras on JAX converts numpy batches
  directly; going through tf.data costs it a third of its speed on this CPU (issue 14).

Either from the training split held in memory (a fresh permutation of all rows per
pass) or streamed from the shards with a bounded shuffle buffer (FeatherReader: shard
order and rows within ~1M-row buffers), for splits larger than memory."""

import numpy as np


def memory_batches(features, labels, batch_size, seed, backend):
    """Endless batches over in-memory arrays, a fresh seeded permutation per pass (the
    rows of a pass that fill no batch are skipped), on either backend."""
    if backend == "tensorflow":
        return _tf_memory_batches(features, labels, batch_size, seed)
    return _numpy_memory_batches(features, labels, batch_size, seed)


def stream_batches(reader, batch_size, seed, backend):
    """Endless shuffled batches streamed from `reader`'s shards (bounded memory)."""
    if backend == "tensorflow":
        import tensorflow as tf
        return (reader.as_tf_dataset(shuffle=True, seed=seed)
                .batch(batch_size, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE))
    return reader.iter_batches(batch_size, shuffle=True, seed=seed, repeat=True)


def permutation_batches(n, batch_size, seed):
    """Endless index batches: per pass a fresh permutation of range(n), cut into whole
    batches. Both backends' in-memory feeds gather these rows."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


def _numpy_memory_batches(features, labels, batch_size, seed):
    for index in permutation_batches(len(features), batch_size, seed):
        yield features[index], labels[index]


def _tf_memory_batches(features, labels, batch_size, seed):
    import tensorflow as tf

    x, y = tf.constant(features), tf.constant(labels)
    return (tf.data.Dataset.from_generator(lambda: permutation_batches(len(features), batch_size, seed),
                                           output_signature=tf.TensorSpec((batch_size,), tf.int64))
            .map(lambda i: (tf.gather(x, i), tf.gather(y, i))).prefetch(2))
