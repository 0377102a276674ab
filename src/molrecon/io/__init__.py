"""File formats: raw k-space in (ISMRMRD, fastMRI HDF5), images out (NIfTI). numpy only, no torch."""
