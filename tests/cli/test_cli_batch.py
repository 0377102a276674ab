"""`molrecon reconstruct` beyond one NIfTI: folders and globs, DICOM series, coil compression,
user coil maps (including BART's), and torchrun sharding of a batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import have, message_lines
from molrecon.cli import app
from molrecon.io.maps import read_cfl, write_cfl
from molrecon.sim import SimulationConfig, simulate_to_file

runner = CliRunner()


def _sim(path: Path, seed: int = 0, coils: int = 4, matrix: tuple[int, int] = (48, 48)) -> Path:
    simulate_to_file(SimulationConfig(kind="2d", matrix=matrix, coils=coils, acceleration=2.0,
                                      seed=seed, slice_position=0.4 + 0.05 * seed), path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "scans"
    d.mkdir()
    _sim(d / "a.h5", 0)
    _sim(d / "b.h5", 1)
    (d / "broken.h5").write_bytes(b"not an hdf5 file at all")
    (d / "notes.txt").write_text("ignored: not a raw-data name")
    return d


def test_folder_batch_reports_every_file_and_goes_on_after_a_failure(tmp_path: Path,
                                                                      folder: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["reconstruct", str(folder), str(out), "-m", "zf"])
    assert res.exit_code == 1, res.output                 # one file failed
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["files"], summary["ok"], summary["failed"]) == (3, 2, 1)
    rows = {Path(r["input"]).name: r for r in summary["results"]}
    assert rows["broken.h5"]["status"] == "failed"
    assert "broken.h5" in rows["broken.h5"]["error"] and "HDF5" in rows["broken.h5"]["error"]
    assert rows["a.h5"]["status"] == "ok" and rows["a.h5"]["kind"] == "2d"
    assert rows["a.h5"]["report"]["method"] == "zf"
    assert "[1/3] a.h5" in res.output and "2 reconstructed, 1 failed" in res.output
    # An earlier batch's folder is not overwritten by accident ...
    again = runner.invoke(app, ["reconstruct", str(folder), str(out), "-m", "zf"])
    assert again.exit_code == 1 and "summary.json" in again.output
    # ... and --skip-existing resumes it: the two done files are left alone.
    (folder / "broken.h5").unlink()
    before = (out / "a.nii.gz").stat().st_mtime_ns
    res = runner.invoke(app, ["reconstruct", str(folder), str(out), "-m", "zf", "--skip-existing"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["results"]] == ["skipped", "skipped"]
    assert (out / "a.nii.gz").stat().st_mtime_ns == before


def test_python_api_batch(tmp_path: Path, folder: Path) -> None:
    from molrecon.jobs import collect_inputs, outputs_for, run_batch, write_summary
    from molrecon.recon import ReconConfig

    files = collect_inputs(folder)
    assert [p.name for p in files] == ["a.h5", "b.h5", "broken.h5"]
    outs = outputs_for(files, tmp_path / "recon", "dicom")
    results = run_batch(files, outs, ReconConfig(method="zf"), fmt="dicom")
    assert [r.status for r in results] == ["ok", "ok", "failed"]
    assert any((tmp_path / "recon" / "a").glob("*.dcm"))
    assert not (tmp_path / "recon" / "broken").exists()
    summary = write_summary(tmp_path / "recon", results, options={"method": "zf"})
    assert json.loads(summary.read_text())["failed"] == 1


def test_glob_with_same_names_in_two_folders(tmp_path: Path) -> None:
    for sub in ("s1", "s2"):
        (tmp_path / sub).mkdir()
        _sim(tmp_path / sub / "meas.h5", seed=len(sub))
    out = tmp_path / "out"
    res = runner.invoke(app, ["reconstruct", str(tmp_path / "s*" / "meas.h5"), str(out),
                              "-m", "zf", "--preview", str(tmp_path / "png")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["s1_meas.nii.gz", "s2_meas.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["s1_meas.png", "s2_meas.png"]
    nothing = runner.invoke(app, ["reconstruct", str(tmp_path / "zz*.h5"), str(out), "-m", "zf"])
    assert nothing.exit_code == 1 and "matches no file" in nothing.output


def test_batch_refuses_a_single_report_path(tmp_path: Path, folder: Path) -> None:
    res = runner.invoke(app, ["reconstruct", str(folder), str(tmp_path / "o"), "-m", "zf",
                              "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "summary.json" in res.output


def test_dicom_series_matches_the_nifti(tmp_path: Path) -> None:
    from molrecon.io.dicom import read_dicom_series

    raw = _sim(tmp_path / "s.h5")
    nii, dcm = tmp_path / "s.nii.gz", tmp_path / "s.dcm"
    assert runner.invoke(app, ["reconstruct", str(raw), str(nii), "-m", "sense"]).exit_code == 0
    res = runner.invoke(app, ["reconstruct", str(raw), str(dcm), "-m", "sense"])
    assert res.exit_code == 0, res.output
    data, affine = read_dicom_series(dcm)
    ref = nib.load(nii)
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)
    expected = np.asarray(ref.dataobj)
    assert np.abs(data - expected).max() <= expected.max() / 65535 * 1.01
    # the format can also be named; a .nii name with --format dicom is a contradiction
    res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "series"), "-m", "zf",
                              "--format", "dicom"])
    assert res.exit_code == 0 and any((tmp_path / "series").glob("*.dcm"))
    bad = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "x.nii"), "--format",
                              "dicom", "-m", "zf"])
    assert bad.exit_code == 1 and "folder" in bad.output
    assert not (tmp_path / "x.nii").exists()


def test_coil_compression_from_the_command_line(tmp_path: Path) -> None:
    raw = _sim(tmp_path / "s.h5", coils=8)
    rep = tmp_path / "r.json"
    res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "o.nii"), "-m", "sense",
                              "--coils", "4", "--report", str(rep)])
    assert res.exit_code == 0, res.output
    cc = json.loads(rep.read_text())["coil_compression"]
    assert (cc["method"], cc["coils_in"], cc["coils_out"]) == ("gcc", 8, 4)
    assert "8→4 coils" in res.output
    for bad in ("0", "many"):
        res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "b.nii"), "--coils", bad])
        assert res.exit_code == 2, res.output
    res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "b.nii"), "--coils", "9"])
    assert res.exit_code == 1 and "cannot compress 8 coils into 9" in res.output
    assert not (tmp_path / "b.nii").exists()


def _own_maps(raw: Path) -> np.ndarray:
    import torch

    from molrecon.io.detect import read_raw
    from molrecon.problem import prepare

    scan = read_raw(raw)
    prep = prepare(torch.from_numpy(scan.kspace), torch.from_numpy(scan.mask),
                   torch.from_numpy(scan.calib), scan.kind)
    return prep.op.maps.numpy()                                      # (B, C, 1, Y, X)


def test_user_maps_npy_h5_and_cfl_reproduce_espirit(tmp_path: Path) -> None:
    import h5py

    raw = _sim(tmp_path / "s.h5")
    maps = _own_maps(raw)
    ref = tmp_path / "ref.nii"
    assert runner.invoke(app, ["reconstruct", str(raw), str(ref), "-m", "sense"]).exit_code == 0
    np.save(tmp_path / "m.npy", maps)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["maps"] = maps * 3.0                          # the scale of a file does not matter
    bart_layout = np.transpose(maps[:, :, 0], (3, 2, 0, 1))[:, :, :, :, None]   # (X, Y, 1, C, 1)
    write_cfl(tmp_path / "m", bart_layout[:, :, :, :, 0])
    np.testing.assert_array_equal(read_cfl(tmp_path / "m.cfl"), bart_layout[:, :, :, :, 0])
    ref_img = np.asarray(nib.load(ref).dataobj)
    for name in ("m.npy", "m.h5", "m.cfl"):
        out = tmp_path / f"{name}.nii"
        res = runner.invoke(app, ["reconstruct", str(raw), str(out), "-m", "sense", "--maps",
                                  str(tmp_path / name)])
        assert res.exit_code == 0, (name, res.output)
        img = np.asarray(nib.load(out).dataobj)
        np.testing.assert_allclose(img, ref_img, atol=2e-3 * ref_img.max(), err_msg=name)


def test_bad_maps_are_refused_naming_the_file(tmp_path: Path) -> None:
    raw = _sim(tmp_path / "s.h5")
    np.save(tmp_path / "wrong.npy", np.ones((1, 3, 1, 48, 48), np.complex64))
    np.save(tmp_path / "nan.npy", np.full((1, 4, 1, 48, 48), np.nan, np.complex64))
    np.save(tmp_path / "os.npy", np.ones((1, 4, 1, 48, 96), np.complex64))
    cases = {"wrong.npy": "needs (1, 4, 1, 48, 48)", "nan.npy": "NaN",
             "os.npy": "oversampled", "missing.npy": "no such file"}
    for name, message in cases.items():
        out = tmp_path / f"{name}.nii"
        res = runner.invoke(app, ["reconstruct", str(raw), str(out), "--maps",
                                  str(tmp_path / name), "-m", "sense"])
        assert res.exit_code == 1, (name, res.output)
        assert name in res.output and message in res.output, (name, res.output)
        assert len(message_lines(res.stderr)) == 1, res.output
        assert not out.exists()


@pytest.mark.external
@pytest.mark.skipif(not have("bart"), reason="needs bart")
def test_maps_from_bart_ecalib(tmp_path: Path) -> None:
    from molrecon.io.detect import read_raw
    from molrecon.metrics import compare

    raw = _sim(tmp_path / "s.h5", coils=8, matrix=(64, 64))
    scan = read_raw(raw)
    k = np.transpose(scan.kspace[0, :, 0], (2, 1, 0))[:, :, None, :]   # (X, Y, 1, C)
    write_cfl(tmp_path / "k", k)
    # -c0: no eigenvalue crop (BART's default 0.8 blanks much of this small field of view)
    subprocess.run(["bart", "ecalib", "-m1", "-c0", str(tmp_path / "k"), str(tmp_path / "sens")],
                   check=True, capture_output=True)
    ours, theirs = tmp_path / "ours.nii", tmp_path / "bart.nii"
    assert runner.invoke(app, ["reconstruct", str(raw), str(ours), "-m", "sense"]).exit_code == 0
    res = runner.invoke(app, ["reconstruct", str(raw), str(theirs), "-m", "sense", "--maps",
                              str(tmp_path / "sens.cfl")])
    assert res.exit_code == 0, res.output
    a = np.asarray(nib.load(ours).dataobj)
    b = np.asarray(nib.load(theirs).dataobj)
    # same data, two map estimators: the images agree far beyond the reconstruction error
    # (a wrong axis order, flip or shift of the maps gives < 15 dB)
    assert compare(b, a).psnr > 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_shards_a_batch_and_merges_the_summary(tmp_path: Path, folder: Path) -> None:
    (folder / "broken.h5").unlink()
    shutil.copy(folder / "a.h5", folder / "c.h5")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "molrecon", "reconstruct", str(folder), str(out), "-m", "zf"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(r["input"]).name for r in summary["results"]] == ["a.h5", "b.h5", "c.h5"]
    assert summary["ok"] == 3 and summary["options"]["ranks"] == 2
    assert "[rank 0]" in done.stderr and "[rank 1]" in done.stderr
    assert done.stdout.count("molrecon reconstruct") == 1      # one merged table, from rank 0


def test_stage_lines_without_a_terminal_and_quiet(tmp_path: Path) -> None:
    raw = _sim(tmp_path / "s.h5")
    res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "a.nii"), "-m", "sense"])
    assert res.exit_code == 0, res.output
    stages = [ln.split(": ", 1)[1] for ln in res.stderr.splitlines() if ln.startswith("[")]
    assert stages == ["coil maps", "CG-SENSE"], res.stderr        # under the runner: no terminal
    assert "wrote " in res.stderr
    res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "b.nii"), "-m", "sense",
                              "--quiet"])
    assert res.exit_code == 0 and not [ln for ln in res.stderr.splitlines() if ln.startswith("[")]


def test_a_batch_loads_the_model_once(tmp_path: Path, folder: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from molrecon.deq.inference import MolEngine
    from molrecon.jobs import collect_inputs, outputs_for, run_batch
    from molrecon.recon import ReconConfig

    (folder / "broken.h5").unlink()
    loads: list[str] = []
    real = MolEngine.from_loaded.__func__                                # type: ignore[attr-defined]

    def counting(cls: type, *args: object, **kwargs: object) -> MolEngine:
        loads.append("load")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(MolEngine, "from_loaded", classmethod(counting))
    files = collect_inputs(folder)
    results = run_batch(files, outputs_for(files, tmp_path / "o", "nifti"),
                        ReconConfig(method="mol", max_iter=3), fmt="nifti")
    assert [r.status for r in results] == ["ok", "ok"] and loads == ["load"]


def test_complex_dicom_is_refused_before_any_work(tmp_path: Path, folder: Path) -> None:
    raw = folder / "a.h5"
    for args in ([str(raw), str(tmp_path / "one.dcm")], [str(folder), str(tmp_path / "many"),
                                                          "--format", "dicom"]):
        res = runner.invoke(app, ["reconstruct", *args, "-m", "zf", "--complex"])
        assert res.exit_code == 1 and "--complex is for NIfTI output" in res.stderr, res.output
        assert len(message_lines(res.stderr)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scans"]


def test_zero_filling_without_torch_equals_the_torch_path(tmp_path: Path) -> None:
    import torch

    from molrecon.io.detect import read_raw
    from molrecon.recon import ReconConfig, reconstruct, zero_filled_rss

    scan = read_raw(_sim(tmp_path / "s.h5"))
    numpy_zf = reconstruct(scan, ReconConfig(method="zf")).image.data
    torch_zf = zero_filled_rss(torch.from_numpy(scan.kspace), scan.kind).numpy()
    np.testing.assert_allclose(np.abs(numpy_zf), torch_zf, rtol=0, atol=1e-5 * torch_zf.max())
