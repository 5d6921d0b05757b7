"""Every error effgen shows a user derives from EffgenError.

`effgen <stage>` catches EffgenError, prints `effgen <stage>: <message>` and exits 1,
without a traceback. The message names the file, column or value at fault. Each class
also derives from the built-in exception it refines, so `except ValueError` callers
keep working."""


class EffgenError(Exception):
    """Base of every user-facing effgen error."""


class ConfigError(EffgenError, ValueError):
    """A flag, environment variable or Make variable has a value effgen cannot use."""


class InputFileError(EffgenError, FileNotFoundError):
    """A file a stage needs is missing or unreadable."""


class ModelFileError(EffgenError, ValueError):
    """A Keras model file exists but cannot be read (corrupt, truncated, not a .keras)."""


class DataError(EffgenError, ValueError):
    """A sample or shard directory is missing, malformed, or holds bad values."""


class PreprocessingError(EffgenError, ValueError):
    """A preprocessing (tX.pkl) is missing, not loadable, or not the expected kind."""


class ProvenanceError(EffgenError, ValueError):
    """Artefacts that must belong together (model, preprocessing, shards) do not."""


class TrainingError(EffgenError, RuntimeError):
    """Training cannot start or continue."""


class UnsupportedModelError(EffgenError, ValueError):
    """The Keras model holds a construct the code generators do not translate."""


class UnsupportedPreprocessingError(EffgenError, ValueError):
    """The fitted preprocessing holds a step the code generators do not translate."""


class ExportError(EffgenError, RuntimeError):
    """The inputs of an export do not fit together."""


class CompileError(EffgenError, RuntimeError):
    """The C compiler or linker failed, or the library breaks the ABI contract."""


class ParityError(EffgenError, RuntimeError):
    """A parity check could not be run."""


class LamarrError(EffgenError, RuntimeError):
    """The SQLamarr runtime check could not be run."""


class BenchError(EffgenError, RuntimeError):
    """A benchmark could not be run."""
