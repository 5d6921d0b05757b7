"""The seed notebook's network: a residual tanh MLP ending in a separate Softmax layer.

Keras is imported inside the function so importing effgen stays light."""


def build_model(n_features=12, n_classes=4, width=128, n_blocks=5, l2=1e-3, seed=None):
    """Input -> Dense(width) -> n_blocks x [x + Dense(width)(x)] -> Dense(n_classes)
    -> Softmax. Every hidden Dense is tanh, he_normal, L2(l2); the output Dense is
    linear, he_normal. The softmax is its own layer because scikinC cannot convert
    an activation given as the string 'softmax'.

    With the defaults the model has 84,740 parameters. `seed` makes the initial
    weights reproducible (each initializer gets its own derived seed)."""
    import keras

    if n_features < 1 or n_classes < 2 or width < 1 or n_blocks < 0:
        raise ValueError(
            f"build_model: need n_features >= 1, n_classes >= 2, width >= 1, n_blocks >= 0; "
            f"got {n_features=}, {n_classes=}, {width=}, {n_blocks=}"
        )

    counter = iter(range(n_blocks + 2))

    def init():
        # A fixed seed shared by all layers would give identical kernels to the
        # same-shaped residual layers; derive one seed per layer instead.
        return keras.initializers.HeNormal(seed=None if seed is None else seed * 1000 + next(counter))

    def hidden():
        return keras.layers.Dense(
            units=width,
            activation="tanh",
            kernel_initializer=init(),
            kernel_regularizer=keras.regularizers.L2(l2),
        )

    inputs = keras.layers.Input(shape=(n_features,))
    x = hidden()(inputs)
    for _ in range(n_blocks):
        r = hidden()(x)
        x = keras.layers.Add()([x, r])
    x = keras.layers.Dense(n_classes, activation="linear", kernel_initializer=init())(x)
    outputs = keras.layers.Softmax()(x)
    return keras.Model(inputs=[inputs], outputs=[outputs])
