"""Model kinds: what a generated library computes, as data the ABI layer reads.

A kind fixes the exported C signature, the inputs and outputs (names, order, docs),
the extra exported functions and the guarantees the ABI layer adds around any
backend's core. Three kinds, in two families (DOMAIN.md sections 4 and 8):

  classifier  float *f(float *out, const float *in)       (SQLamarr Plugin)
    efficiency  Softmax over 4 classes: Lamarr's tracking efficiency
    sigmoid     one Dense(1, sigmoid) output: Lamarr's acceptance
  generator   float *f(float *out, const float *in, const float *rnd)
                                                           (SQLamarr GenerativePlugin)
    generator   Concatenate([tX(in), rnd]) -> network -> inverse of tY

Each kind has its ABI templates under templates/abi/ (`<name>.c.j2`, `<name>.h.j2`);
backends see it only through `n_inputs`, `n_outputs`, `noise_inputs` and `signature`.
The kind is read from the model itself (`kind_of`); the sigmoid and generator kinds
take their input and output names at export (`io_names`, `ModelKind.named`).
"""

from dataclasses import dataclass, field, replace

from effgen import schema
from effgen.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelKind:
    """One kind of model library.

    `signature` lists the C parameters of the one-row function after `out`
    ("in" for f(out, in); a generator would add "rnd"); `noise_inputs` is the size
    of such an extra input (0: none). `export_suffixes` are appended to the symbol
    for every exported name (the first, "", is the one-row entry point).
    `guarantees` are one-line statements the kind's ABI template implements and the
    header documents; tests hold the template to them."""
    name: str
    description: str
    inputs: tuple
    outputs: tuple
    input_docs: dict = field(default_factory=dict)
    output_docs: dict = field(default_factory=dict)
    signature: tuple = ("in",)
    noise_inputs: int = 0
    export_suffixes: tuple = ("", "_batch", "_manifest")
    guarantees: tuple = ()
    family: str = "classifier"

    def named(self, inputs, outputs, noise_inputs=None) -> "ModelKind":
        """This kind with the model's own input and output names (and noise width)."""
        return replace(self, inputs=tuple(inputs), outputs=tuple(outputs),
                       noise_inputs=self.noise_inputs if noise_inputs is None else int(noise_inputs))

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    @property
    def source_template(self) -> str:
        return f"abi/{self.name}.c.j2"

    @property
    def header_template(self) -> str:
        return f"abi/{self.name}.h.j2"

    def exported_names(self, symbol: str) -> list:
        return [symbol + s for s in self.export_suffixes]


EFFICIENCY = ModelKind(
    name="efficiency",
    description="Lamarr tracking-efficiency model",
    inputs=tuple(schema.FEATURES),
    outputs=tuple(schema.OUTPUTS),
    # What each raw feature is (DOMAIN.md section 2), for the generated header.
    input_docs={
        "mc_x": "production-vertex x [mm]",
        "mc_y": "production-vertex y [mm]",
        "mc_z": "production-vertex z [mm]",
        "mc_log10_p": "log10 of the momentum magnitude [p in MeV/c]",
        "mc_tx": "px / pz",
        "mc_ty": "py / pz",
        "mc_eta": "pseudorapidity",
        "mc_phi": "azimuth atan2(py, px) [rad]",
        "mc_is_e": "1 if abs(pid) == 11 else 0",
        "mc_is_mu": "1 if abs(pid) == 13 else 0",
        "mc_is_h": "1 if abs(pid) in {211, 321, 2212} else 0",
        "mc_charge": "charge used for propagation (+1 / -1)",
    },
    output_docs={
        "not_recoed": "not reconstructed (track type 0)",
        "long": "reconstructed as long (track type 3)",
        "upstream": "reconstructed as upstream (track type 4)",
        "downstream": "reconstructed as downstream (track type 5)",
    },
    export_suffixes=("", "_batch", "_track_type", "_manifest"),
    guarantees=(
        "a NaN input gives {1, 0, 0, 0} (not reconstructed)",
        "+-inf inputs are taken as +-FLT_MAX",
        "every output in [0, 1]",
        "out[0] + 0 + 0 + out[1] + out[2] in float never above 1 (Lamarr's random_category)",
        "SYMBOL_track_type(in, r) draws as random_category(out[0], 0, 0, out[1], out[2])",
    ),
)

SIGMOID = ModelKind(
    name="sigmoid",
    description="one-output sigmoid classifier (Lamarr acceptance)",
    inputs=tuple(schema.FEATURES),
    outputs=("acceptance",),
    input_docs=dict(EFFICIENCY.input_docs),
    output_docs={"acceptance": "probability that the particle is in the acceptance"},
    export_suffixes=("", "_batch", "_draw", "_manifest"),
    guarantees=(
        "a NaN input gives 0",
        "+-inf inputs are taken as +-FLT_MAX",
        "the output in [0, 1]; (1 - out[0]) + out[0] in float never above 1",
        "SYMBOL_draw(in, r) draws as random_category(1 - out[0], out[0]): 1 = accepted",
    ),
)

GENERATOR = ModelKind(
    name="generator",
    description="generative model (SQLamarr GenerativePlugin)",
    inputs=(),
    outputs=(),
    signature=("in", "rnd"),
    noise_inputs=0,  # set per model by `named`
    family="generator",
    guarantees=(
        "a NaN in any input or noise value gives NaN in every output",
        "+-inf inputs and noise values are taken as +-FLT_MAX",
        "outputs in physical units: the inverse of the output transform tY applied",
    ),
)

KINDS = {k.name: k for k in (EFFICIENCY, SIGMOID, GENERATOR)}

# Names of the known Lamarr tracking symbols (DOMAIN.md section 8), used when the
# fitted transforms carry none. The covariance's 10 correlations, in the model's order.
_RESOLUTION_INPUTS = ("x_ClosestToBeam", "y_ClosestToBeam", "z_ClosestToBeam",
                      "tx_ClosestToBeam", "ty_ClosestToBeam", "mc_log10_p",
                      "mc_is_e", "mc_is_mu", "mc_is_h", "long", "upstream", "downstream")
_RESOLUTION_OUTPUTS = ("dx", "dy", "dz", "dtx", "dty", "dp", "chi2PerDoF", "nDoF_f", "ghostProb")
_CORR = ("0_1", "0_2", "1_2", "0_3", "1_3", "2_3", "0_4", "1_4", "2_4", "3_4")
DEFAULT_NAMES = {
    "acceptance": (tuple(schema.FEATURES), ("acceptance",)),
    "efficiency": (tuple(schema.FEATURES), tuple(schema.OUTPUTS)),
    "resolution": (_RESOLUTION_INPUTS, _RESOLUTION_OUTPUTS),
    "covariance": (_RESOLUTION_INPUTS[:6] + ("chi2PerDoF", "nDoF_f", "ghostProb")
                   + _RESOLUTION_INPUTS[6:],
                   tuple(f"log_cov_ClosestToBeam_{i}_{i}" for i in range(5))
                   + tuple(f"corr_ClosestToBeam_{c}" for c in _CORR)),
}


def kind_of(chain, where="model") -> ModelKind:
    """The kind a model's chain (effgen.codegen.graph) is: a two-input model is a
    generator, a last Dense(1, sigmoid) the sigmoid classifier, and 4 outputs the
    efficiency (its Softmax layer, or any last activation, as effgen has always exported
    them); anything else is refused, naming the last layer and its number of outputs."""
    if chain.n_random:
        return GENERATOR
    if not chain.ops:
        if chain.n_outputs == EFFICIENCY.n_outputs:
            return EFFICIENCY
        raise UnsupportedModelError(f"{where}: no layer, {chain.n_outputs} outputs")
    last = chain.ops[-1]
    if chain.ends_with_softmax:
        if chain.n_outputs == EFFICIENCY.n_outputs:
            return EFFICIENCY
        raise UnsupportedModelError(
            f"{where}: layer {last.name!r} is a Softmax over {chain.n_outputs} outputs; the "
            f"softmax kind is the {EFFICIENCY.n_outputs}-class efficiency")
    activation = getattr(getattr(last, "dense", last), "activation", None)
    if activation == "sigmoid" and chain.n_outputs == 1 and type(last).__name__ == "Dense":
        return SIGMOID
    if chain.n_outputs == EFFICIENCY.n_outputs:
        return EFFICIENCY
    raise UnsupportedModelError(
        f"{where}: last layer {last.name!r} is {type(last).__name__}({chain.n_outputs}, "
        f"{activation}), {chain.n_outputs} outputs; effgen deploys 4 outputs (efficiency), "
        f"a Dense(1, sigmoid) classifier (acceptance) or a generator with two inputs "
        f"(features, noise) joined by Concatenate")


def _fitted_names(transform, n):
    names = getattr(transform, "feature_names_in_", None)
    if names is None or len(names) != n:
        return None
    names = [str(x) for x in names]
    if all(x.isidentifier() for x in names):  # not sklearn's default x0, x1 ... of arrays
        return tuple(names)
    return None


def io_names(kind: ModelKind, symbol, n_inputs, n_outputs, preprocessing=None,
             postprocessing=None) -> tuple:
    """(input names, output names) for the header and manifest. The efficiency kind
    keeps its own; otherwise the fitted tX's / tY's `feature_names_in_` when present,
    else the defaults of the known Lamarr symbol (DEFAULT_NAMES), else in0.., out0..."""
    if kind is EFFICIENCY:
        return kind.inputs, kind.outputs
    default_in, default_out = DEFAULT_NAMES.get(symbol, ((), ()))
    inputs = (_fitted_names(preprocessing, n_inputs)
              or (default_in if len(default_in) == n_inputs else None)
              or tuple(f"in{i}" for i in range(n_inputs)))
    outputs = (_fitted_names(postprocessing, n_outputs)
               or (default_out if len(default_out) == n_outputs else None)
               or tuple(f"out{i}" for i in range(n_outputs)))
    return inputs, outputs


def get_kind(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"model kind {name!r}: expected one of {sorted(KINDS)}") from None
