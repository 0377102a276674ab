"""File formats: raw k-space in (ISMRMRD, MRD v2, fastMRI HDF5, Siemens twix), images out
(NIfTI, DICOM), user coil maps (npy, h5, BART cfl). numpy only, no torch."""
