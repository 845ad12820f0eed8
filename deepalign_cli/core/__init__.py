"""Pure array functions: geometry, symmetry, regions, imaging, CNN, search, consensus,
reconstruction. No file I/O, no printing, no global state."""
