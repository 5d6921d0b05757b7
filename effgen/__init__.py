"""effgen: train the Lamarr tracking-efficiency model and deploy it as plain C."""

__version__ = "0.1.0"
