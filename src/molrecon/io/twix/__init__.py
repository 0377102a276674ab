"""Siemens twix raw data (``.dat``): VB single-measurement and VD/VE multi-raid files.

The file is parsed with twixtools (MIT; imported only when a twix file is read):
its protocol header (the ``MeasYaps`` ASCCONV text, ``Meas``/``Dicom``
XProtocol maps) and its measurement data headers (MDHs), one per readout.
molrecon then translates every MDH into an ISMRMRD acquisition header in memory
and hands the lines to the ISMRMRD reader's planner and assembler
(:mod:`molrecon.io.ismrmrd`): flags, counters, readout placement, readout
oversampling removal, averaging, calibration, slice ordering, geometry and
prewhitening are then exactly those of an ISMRMRD file converted from the same
scan, and the two readers cannot drift apart.

The stages, one module each:

* :mod:`.layout`: recognising a twix file from its content (:func:`is_twix`), its
  measurements and their completeness, the calls into twixtools;
* :mod:`.protocol`: the protocol header -> the ISMRMRD header fields (matrix
  sizes, fields of view, encoding limits, scanner and sequence facts);
* :mod:`.heads`: the MDHs -> ISMRMRD acquisition headers (the table of fields);
* :mod:`.reader`: :func:`read_twix`, the stages in order, the noise scan and the
  readouts' samples.

Which data are used
-------------------
The image scan is the file's last measurement. Coil noise comes from its
``NOISEADJSCAN`` readouts, or, without any, from those of the measurement before
(the noise-adjustment measurement of a VD/VE file).

So (see :mod:`molrecon.io.ismrmrd` for the details): lines sit at their Lin/Par
counters with the MDH k-space centre (``CenterLin`` / ``CenterPar``, Siemens'
``ushKSpaceCentreLineNo`` / ``...PartitionNo``) at grid index ``n // 2`` and the
readout's ``CenterCol`` at ``x_enc // 2`` (asymmetric echoes and partial
Fourier zero-filled); averages are averaged; ``PATREFSCAN`` lines are data
where no imaging line covers their position and mark ``calib`` (without any
such flag ``calib`` is the fully sampled centre); slices (Sli -> B) are ordered
along the slice direction; a 3D scan (``sKSpace.ucDimension`` 4) puts Par on D;
a 2D scan with several cardiac phases (Phs), or else several repetitions
(Rep), becomes ``"2dt"`` with the frames on D, ``frame_time_ms`` from the MDH
time stamps (what the converters copy into ``acquisition_time_stamp``), else
from the protocol's TR; only the first echo (Eco) and set are used, with a
warning.

Refused (:class:`~molrecon.errors.InputDataError`, one line naming the file)
----------------------------------------------------------------------------
EPI (an EPI factor above 1 or phase-correction readouts), simultaneous
multi-slice, non-Cartesian trajectories (radial, spiral, PROPELLER/BLADE),
reflected readouts outside EPI; an empty file; a file shorter than its
multi-raid header or whose measurements end past the end of the file, a
measurement without its closing ACQEND block or with a readout that runs past
its end (a truncated copy); any failure of twixtools (its message, first line);
and everything the ISMRMRD planner refuses (inconsistent readout lengths or coil
counts, k-space beyond ``MAX_KSPACE_ELEMENTS`` or the memory available now).
"""

from __future__ import annotations

from .layout import is_twix
from .reader import read_twix

__all__ = ["is_twix", "read_twix"]
