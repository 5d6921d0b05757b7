"""Model kinds: what a generated library computes, as data the ABI layer reads.

A kind fixes the exported C signature, the inputs and outputs (names, order, docs),
the extra exported functions and the guarantees the ABI layer adds around any
backend's core. Today there is one kind, Lamarr's four-class tracking efficiency.
A new kind (e.g. a one-output sigmoid acceptance, or a generator f(out, in, rnd)
with a noise input) is a new `ModelKind` registered here plus its ABI templates
under templates/abi/ (`<name>.c.j2`, `<name>.h.j2`); backends see it only through
`n_inputs`, `n_outputs` and `signature`.
"""

from dataclasses import dataclass, field

from effgen import schema


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

KINDS = {k.name: k for k in (EFFICIENCY,)}


def get_kind(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"model kind {name!r}: expected one of {sorted(KINDS)}") from None
