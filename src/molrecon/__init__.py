"""molrecon: MRI reconstruction from raw multicoil k-space with Monotone Operator Learning.

The Python API mirrors the command line::

    import molrecon
    scan = molrecon.read_raw("raw.h5")                 # ISMRMRD, MRD v2, fastMRI, Siemens twix
    image = molrecon.reconstruct(scan, method="mol")   # ImageVolume
    molrecon.write_nifti(image, "out.nii.gz")

Heavy modules (torch) are imported lazily, on first use.
"""

from __future__ import annotations

from .lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "read_raw": "molrecon.io.detect",
    "write_nifti": "molrecon.io.nifti",
    "read_nifti": "molrecon.io.nifti",
    "reconstruct": "molrecon.recon",
    "ReconConfig": "molrecon.recon",
    "SimulationConfig": "molrecon.sim",
    "simulate_to_file": "molrecon.sim",
    "compare": "molrecon.metrics",
    "RawScan": "molrecon.io.types",
    "ImageVolume": "molrecon.io.types",
    "Geometry": "molrecon.io.types",
    "MolreconError": "molrecon.errors",
    "InputDataError": "molrecon.errors",
    "CheckpointError": "molrecon.errors",
}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = [*sorted(_LAZY), "__version__"]  # noqa: PLE0604 - strings, from the lazy table
