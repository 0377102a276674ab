"""MRD v2 reader: the same scan as its ISMRMRD original, content detection, refusals.

MRD v2 files are written with mrd-python's own writers (binary and NDJSON) from
ISMRMRD files that molrecon simulates (and from the real GRE scan where present):
the header XML is parsed with ismrmrd's schema classes and each row of the
acquisition table becomes a v2 acquisition. mrd-python ships no ISMRMRD -> MRD
converter in Python (the C++ ``ismrmrd_to_mrd`` is not on PyPI), hence
:func:`to_mrd2` below.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import real_file
from molrecon.cli import app
from molrecon.errors import ConfigError, InputDataError
from molrecon.io.detect import detect_format, read_raw
from molrecon.io.ismrmrd import parse_ismrmrd_header, read_ismrmrd
from molrecon.io.mrd import _fields, _schema_end, is_mrd2, read_mrd2
from molrecon.sim import SimulationConfig, simulate_to_file

mrd = pytest.importorskip("mrd")

runner = CliRunner()

_COUNTERS = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast",
             "phase", "repetition", "set", "segment")
_LIMITS = ("kspace_encoding_step_0", "kspace_encoding_step_1", "kspace_encoding_step_2",
           "average", "slice", "contrast", "phase", "repetition", "set", "segment")


# --------------------------------------------------------------------------- ISMRMRD -> MRD v2
def _v2_header(xml: bytes) -> Any:
    """The ``mrd.Header`` of an ISMRMRD XML header (the fields a reader may need)."""
    from ismrmrd import xsd

    h = xsd.CreateFromDocument(xml)

    def space(s: Any) -> Any:
        m, f = s.matrixSize, s.fieldOfView_mm
        return mrd.EncodingSpaceType(matrix_size=mrd.MatrixSizeType(x=m.x, y=m.y, z=m.z),
                                     field_of_view_mm=mrd.FieldOfViewMm(x=f.x, y=f.y, z=f.z))

    def limits(lims: Any) -> Any:
        out = {}
        for name in _LIMITS:
            lim = getattr(lims, name, None)
            if lim is not None:
                out[name] = mrd.LimitType(minimum=lim.minimum, maximum=lim.maximum,
                                          center=lim.center)
        return mrd.EncodingLimitsType(**out)

    def parallel(p: Any) -> Any:
        if p is None:
            return None
        af = p.accelerationFactor
        return mrd.ParallelImagingType(
            acceleration_factor=mrd.AccelerationFactorType(
                kspace_encoding_step_1=af.kspace_encoding_step_1,
                kspace_encoding_step_2=af.kspace_encoding_step_2),
            calibration_mode=(None if p.calibrationMode is None
                              else mrd.CalibrationMode[p.calibrationMode.name]))

    encodings = [mrd.EncodingType(encoded_space=space(e.encodedSpace),
                                  recon_space=space(e.reconSpace),
                                  encoding_limits=limits(e.encodingLimits),
                                  trajectory=mrd.Trajectory[e.trajectory.name],
                                  parallel_imaging=parallel(e.parallelImaging))
                 for e in h.encoding]
    s, m, q = h.acquisitionSystemInformation, h.measurementInformation, h.sequenceParameters
    return mrd.Header(
        encoding=encodings,
        acquisition_system_information=None if s is None else mrd.AcquisitionSystemInformationType(
            system_vendor=s.systemVendor, system_model=s.systemModel,
            system_field_strength_t=s.systemFieldStrength_T, receiver_channels=s.receiverChannels),
        measurement_information=None if m is None else mrd.MeasurementInformationType(
            protocol_name=m.protocolName,
            patient_position=mrd.PatientPosition[m.patientPosition.name[0] + "_"
                                                 + m.patientPosition.name[1:]]),
        sequence_parameters=None if q is None else mrd.SequenceParametersType(
            t_r=list(q.TR), t_e=list(q.TE)),
        experimental_conditions=mrd.ExperimentalConditionsType(
            h1resonance_frequency_hz=h.experimentalConditions.H1resonanceFrequency_Hz),
    )


def _v2_acquisition(row: np.void) -> Any:
    hd = row["head"]
    n_c, n_s, n_t = (int(hd["active_channels"]), int(hd["number_of_samples"]),
                     int(hd["trajectory_dimensions"]))
    head = mrd.AcquisitionHeader(
        flags=mrd.AcquisitionFlags(int(hd["flags"])),
        idx=mrd.EncodingCounters(**{name: int(hd["idx"][name]) for name in _COUNTERS}),
        measurement_uid=int(hd["measurement_uid"]),
        scan_counter=int(hd["scan_counter"]),
        acquisition_time_stamp=int(hd["acquisition_time_stamp"]),
        physiology_time_stamp=[int(v) for v in hd["physiology_time_stamp"]],
        channel_order=list(range(n_c)),
        discard_pre=int(hd["discard_pre"]),
        discard_post=int(hd["discard_post"]),
        center_sample=int(hd["center_sample"]),
        encoding_space_ref=int(hd["encoding_space_ref"]),
        sample_time_us=float(hd["sample_time_us"]),
        **{name: np.asarray(hd[name], dtype=np.float32)
           for name in ("position", "read_dir", "phase_dir", "slice_dir",
                        "patient_table_position")},
    )
    data = np.asarray(row["data"], dtype=np.float32).view(np.complex64).reshape(n_c, n_s)
    traj = np.asarray(row["traj"], dtype=np.float32).reshape(n_t, n_s) if n_t else None
    return mrd.Acquisition(head=head, data=data, trajectory=traj)


def to_mrd2(h5: Path, out: Path, *, ndjson: bool = False,
            header: Callable[[Any], Any] | None = None,
            acquisition: Callable[[Any], Any] | None = None) -> Path:
    """Write the ISMRMRD file ``h5`` as an MRD v2 stream; ``header`` / ``acquisition`` edit."""
    with h5py.File(h5, "r") as f:
        xml = bytes(f["dataset/xml"][0])
        table = f["dataset/data"][...]
    hdr = _v2_header(xml)
    if header is not None:
        hdr = header(hdr)

    def items() -> Any:
        for row in table:
            acq = _v2_acquisition(row)
            if acquisition is not None:
                acq = acquisition(acq)
            yield mrd.StreamItem.Acquisition(acq)

    writer = mrd.NDJsonMrdWriter if ndjson else mrd.BinaryMrdWriter
    with writer(str(out)) as w:
        w.write_header(hdr)
        w.write_data(items())
    return out


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scan2d(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A simulated 2-slice 2D scan with a noise scan: ISMRMRD, MRD v2 binary and NDJSON."""
    folder = tmp_path_factory.mktemp("mrd2")
    h5 = folder / "scan.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(48, 48), coils=4, acceleration=2.0,
                                      slices=2, seed=3), h5)
    return {"h5": h5, "bin": to_mrd2(h5, folder / "scan.mrd"),
            "ndjson": to_mrd2(h5, folder / "scan.ndjson", ndjson=True)}


def assert_same_scan(a: Any, b: Any, exact: bool = True) -> None:
    """``a`` (from MRD v2) holds what ``b`` (from ISMRMRD) holds."""
    assert a.shape == b.shape and a.kind == b.kind
    tol = 0.0 if exact else 1e-6 * float(np.abs(b.kspace).max())
    assert float(np.abs(a.kspace - b.kspace).max()) <= tol
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.calib, b.calib)
    assert a.whitened == b.whitened
    if b.noise_cov is None:
        assert a.noise_cov is None
    else:
        assert np.allclose(a.noise_cov, b.noise_cov, rtol=1e-6, atol=0)
    g, h = a.geometry, b.geometry
    assert (g.fov_mm, g.matrix, g.slice_spacing_mm, g.frame_time_ms, g.orientation_known) == (
        h.fov_mm, h.matrix, h.slice_spacing_mm, h.frame_time_ms, h.orientation_known)
    for name in ("position", "read_dir", "phase_dir", "slice_dir"):
        assert np.array_equal(getattr(g, name), getattr(h, name)), name
    i, j = a.info, b.info
    assert (i.format, j.format) == ("mrd2", "ismrmrd")
    for name in ("vendor", "model", "field_strength_t", "protocol", "tr_ms", "te_ms",
                 "encoded_matrix", "encoded_fov_mm", "readout_oversampling", "partial_fourier",
                 "averages", "n_acquisitions", "n_noise_acquisitions", "warnings"):
        assert getattr(i, name) == getattr(j, name), name


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("encoding", ["bin", "ndjson"])
@pytest.mark.parametrize("prewhiten", [True, False])
def test_same_scan_as_the_ismrmrd_original(scan2d: dict[str, Path], encoding: str,
                                           prewhiten: bool) -> None:
    scan = read_mrd2(scan2d[encoding], prewhiten=prewhiten)
    ref = read_ismrmrd(scan2d["h5"], prewhiten=prewhiten)
    assert scan.shape == (2, 4, 1, 48, 48) and scan.info.n_noise_acquisitions > 0
    assert scan.whitened is prewhiten and scan.info.warnings == ()
    assert_same_scan(scan, ref)
    assert scan.source == str(scan2d[encoding])


def test_header_maps_to_the_same_fields_as_the_xml(scan2d: dict[str, Path]) -> None:
    with h5py.File(scan2d["h5"], "r") as f:
        xml = bytes(f["dataset/xml"][0])
    with open(scan2d["bin"], "rb") as f:
        reader = mrd.BinaryMrdReader(f)
        header = reader.read_header()
        for _ in reader.read_data():
            pass
        reader.close()
    assert _fields(header, scan2d["bin"]) == parse_ismrmrd_header(xml)


@pytest.mark.parametrize("config", [
    SimulationConfig(kind="3d", matrix=(24, 24, 8), fov_mm=(240.0, 240.0, 40.0), coils=4,
                     acceleration=2.0, seed=1),
    SimulationConfig(kind="2dt", matrix=(32, 32), coils=3, acceleration=2.0, frames=4, seed=2),
], ids=["3d", "2dt"])
def test_3d_and_2dt_scans(tmp_path: Path, config: SimulationConfig) -> None:
    h5 = tmp_path / "scan.h5"
    simulate_to_file(config, h5)
    scan = read_mrd2(to_mrd2(h5, tmp_path / "scan.bin"))
    assert scan.kind == config.kind
    assert_same_scan(scan, read_ismrmrd(h5))


def test_real_gre_scan(real_data: Path, tmp_path: Path) -> None:
    h5 = real_file(real_data, "siemens_gre_2coil_full.h5")
    scan = read_mrd2(to_mrd2(h5, tmp_path / "gre.mrd"))
    ref = read_ismrmrd(h5)
    assert scan.shape == (1, 2, 1, 160, 160) and scan.info.vendor == "SIEMENS"
    assert_same_scan(scan, ref)


# --------------------------------------------------------------------------- detection
def test_detected_by_content_not_by_name(scan2d: dict[str, Path], tmp_path: Path) -> None:
    disguised = {"bin": tmp_path / "scan.h5", "ndjson": tmp_path / "meas.dat",
                 "h5": tmp_path / "scan.mrd"}
    for key, dst in disguised.items():
        dst.write_bytes(scan2d[key].read_bytes())
    assert is_mrd2(disguised["bin"]) and is_mrd2(disguised["ndjson"])
    assert not is_mrd2(disguised["h5"])
    assert detect_format(disguised["bin"]) == ("mrd2", None)
    assert detect_format(disguised["ndjson"]) == ("mrd2", None)
    assert detect_format(disguised["h5"]) == ("ismrmrd", "dataset")
    assert read_raw(disguised["bin"]).info.format == "mrd2"
    assert read_raw(disguised["h5"]).info.format == "ismrmrd"
    empty = tmp_path / "empty.mrd"
    empty.write_bytes(b"")
    for path in (empty, tmp_path / "missing.mrd", tmp_path):
        assert not is_mrd2(path)


def test_other_yardl_protocols_are_not_mrd2(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    with mrd.BinaryMrdNoiseCovarianceWriter(str(path)) as w:
        w.write_noise_covariance(mrd.NoiseCovariance())
    assert path.read_bytes().startswith(b"yardl") and not is_mrd2(path)
    with pytest.raises(InputDataError, match="is not an MRD v2 stream"):
        read_mrd2(path)


def test_dataset_option_is_refused(scan2d: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="--dataset is for ISMRMRD files"):
        read_raw(scan2d["bin"], dataset="dataset")


# --------------------------------------------------------------------------- refusals
def one_line(exc: pytest.ExceptionInfo[InputDataError], path: Path, needle: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and needle in text, text


@pytest.mark.parametrize("encoding", ["bin", "ndjson"])
def test_truncated_files_are_refused_in_one_line(scan2d: dict[str, Path], tmp_path: Path,
                                                 encoding: str) -> None:
    data = scan2d[encoding].read_bytes()
    cut = tmp_path / "cut"
    for n in (12, 4000, len(data) // 3, len(data) - 20, len(data) - 2):
        cut.write_bytes(data[:n])
        assert is_mrd2(cut)
        with pytest.raises(InputDataError) as exc:
            read_mrd2(cut)
        one_line(exc, cut, "is truncated")


def test_damaged_and_foreign_streams_are_refused(scan2d: dict[str, Path],
                                                 tmp_path: Path) -> None:
    data = scan2d["bin"].read_bytes()
    end = _schema_end(data[:32])  # the header follows the schema
    bad = tmp_path / "bad.mrd"
    bad.write_bytes(data[:end + 5] + b"\xff" * 12 + data[end + 17:])
    with pytest.raises(InputDataError) as exc:
        read_mrd2(bad)
    one_line(exc, bad, "is damaged inside its header")
    bad.write_bytes(data[:end - 40] + b"\x00" + data[end - 39:])
    with pytest.raises(InputDataError) as exc:
        read_mrd2(bad)
    one_line(exc, bad, "its schema (the stream's self-description) is not valid JSON")
    # A valid schema of the same length that is not the installed one: another MRD version.
    bad.write_bytes(data.replace(b'"AccelerationFactorType"', b'"AccelerationFactorTypX"', 1))
    with pytest.raises(InputDataError) as exc:
        read_mrd2(bad)
    one_line(exc, bad, "another version of the MRD schema")


def test_missing_mrd_python_says_how_to_install(scan2d: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mrd", None)  # import mrd -> ImportError
    with pytest.raises(InputDataError) as exc:
        read_mrd2(scan2d["bin"])
    one_line(exc, scan2d["bin"], "pip install mrd-python")


def _radial(header: Any) -> Any:
    header.encoding[0].trajectory = mrd.Trajectory.RADIAL
    return header


def _with_trajectory(acq: Any) -> Any:
    if not acq.head.flags & mrd.AcquisitionFlags.IS_NOISE_MEASUREMENT:
        acq.trajectory = np.zeros((2, acq.data.shape[1]), dtype=np.float32)
    return acq


def _no_header(header: Any) -> None:
    return None


def _huge_slice(acq: Any) -> Any:
    acq.head.idx.slice = 70000
    return acq


def _mixed_coils(acq: Any) -> Any:
    if acq.head.idx.kspace_encode_step_1 == 20:
        acq.data = acq.data[:2].copy()
    return acq


@pytest.mark.parametrize("edit, needle", [
    ({"header": _radial}, "trajectory is 'radial'"),
    ({"acquisition": _with_trajectory}, "trajectory coordinates (non-Cartesian data)"),
    ({"header": _no_header}, "has no header"),
    ({"acquisition": _huge_slice}, "idx.slice holds 70000"),
    ({"acquisition": _mixed_coils}, "inconsistent coil counts"),
], ids=["radial", "trajectory", "no-header", "counter-range", "coils"])
def test_unsupported_streams_are_refused(scan2d: dict[str, Path], tmp_path: Path,
                                         edit: dict[str, Any], needle: str) -> None:
    path = to_mrd2(scan2d["h5"], tmp_path / "edited.mrd", **edit)
    with pytest.raises(InputDataError) as exc:
        read_mrd2(path)
    one_line(exc, path, needle)


# --------------------------------------------------------------------------- CLI
def test_info_describes_an_mrd2_file(scan2d: dict[str, Path]) -> None:
    result = runner.invoke(app, ["info", str(scan2d["bin"]), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    result = runner.invoke(app, ["info", str(scan2d["h5"]), "--json"])
    assert result.exit_code == 0, result.output
    ref = json.loads(result.stdout)
    assert (got.pop("format"), ref.pop("format")) == ("mrd2", "ismrmrd")
    got.pop("file"), ref.pop("file")
    assert got == ref
    result = runner.invoke(app, ["info", str(scan2d["bin"])])
    assert result.exit_code == 0 and "mrd2" in result.stdout, result.output


def test_reconstruct_gives_the_image_of_the_ismrmrd_original(scan2d: dict[str, Path],
                                                             tmp_path: Path) -> None:
    out, ref = tmp_path / "mrd2.nii", tmp_path / "ismrmrd.nii"
    for src, dst in ((scan2d["bin"], out), (scan2d["h5"], ref)):
        result = runner.invoke(app, ["reconstruct", str(src), str(dst), "--method", "sense"])
        assert result.exit_code == 0, result.output
    a, b = nib.load(out), nib.load(ref)
    assert a.shape == b.shape and np.array_equal(a.affine, b.affine)
    assert np.array_equal(a.get_fdata(), b.get_fdata())


def test_cli_refuses_a_truncated_file_in_one_line(scan2d: dict[str, Path],
                                                  tmp_path: Path) -> None:
    cut = tmp_path / "cut.mrd"
    data = scan2d["bin"].read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    result = runner.invoke(app, ["reconstruct", str(cut), str(tmp_path / "o.nii")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is truncated" in lines[0], result.stderr
    assert "Traceback" not in result.output
