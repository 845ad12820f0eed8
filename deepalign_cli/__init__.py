"""deepalign: 3D alignment of cryo-EM particle images by regionalised deep learning.

A JAX reimplementation of DeepAlign (Jiménez-Moreno et al., J. Struct. Biol. 2021).
`core/` holds pure array functions, `io/` the file formats, `commands/` one module per stage.
"""

__version__ = "0.1.0"

from . import xla_cpu as _xla_cpu

_xla_cpu.configure()  # before any JAX computation: XLA reads XLA_FLAGS once, at backend start

from . import host_malloc as _host_malloc

_host_malloc.configure()  # glibc keeps freed blocks below 1 GiB for reuse (one arena: train/predict, from 48 px)
