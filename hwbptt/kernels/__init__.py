"""Compiled fast paths for the core, each with its plain-torch twin beside it.

- ``cbuild``: builds small C kernels with the system C compiler at first use and loads
  them with ``ctypes`` (the CPU fast paths); ``status()`` says which are active and why.
- ``cpu_scan``: the linear scan as one sequential pass over time, vectorised across lanes
  (CPU, float32/float64).
- ``triton_scan``: the same scan as a Triton kernel for CUDA tensors.

Nothing here changes a result: every kernel computes the recurrence its reference
computes; which one ran is reported by ``status()`` and printed by ``python -m hwbptt
bench``. ``HWBPTT_KERNELS=0`` turns the compiled kernels off (plain torch everywhere).
"""

from .cbuild import kernels_enabled, status

__all__ = ["kernels_enabled", "status"]
