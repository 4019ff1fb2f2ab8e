"""hawkspec: draft heads and speculative decoders for autoregressive text-to-image models."""

__version__ = "0.1.0"
