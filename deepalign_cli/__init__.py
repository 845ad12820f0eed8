"""deepalign: 3D alignment of cryo-EM particle images by regionalised deep learning.

A JAX reimplementation of DeepAlign (Jiménez-Moreno et al., J. Struct. Biol. 2021).
`core/` holds pure array functions, `io/` the file formats, `commands/` one module per stage.

Importing the package changes nothing in the process. The process-wide settings deepalign runs
with (XLA:CPU flags, glibc malloc thresholds) are applied by `runtime.configure_process()`, which
the `deepalign` entry point calls first; a script that drives JAX itself calls it before JAX starts.
"""

__version__ = "0.1.0"
