"""C backends: each turns a Keras model and its preprocessing into core C code that
effgen.codegen.abi wraps with the Lamarr ABI."""
