"""AR and the speculative decoders. Importing the package pins the CPU thread teams (OpenMP's and MKL's dynamic
adjustment off, :func:`hawkspec.determinism.pin_dynamic`), so a loaded machine decodes the same bits."""

from hawkspec.determinism import pin_dynamic as _pin_dynamic

_pin_dynamic()
