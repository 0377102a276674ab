"""Files that hold several ISMRMRD datasets: listed by `info`, chosen with --dataset, and
a warning (not silence) when none is chosen."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from molrecon.cli import app
from molrecon.errors import ConfigError, InputDataError, InputDataWarning
from molrecon.io.detect import ismrmrd_groups, read_raw
from molrecon.sim import SimulationConfig, simulate_to_file

runner = CliRunner()


@pytest.fixture
def two(tmp_path: Path) -> Path:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(32, 32), coils=4, acceleration=2.0), a)
    simulate_to_file(SimulationConfig(kind="2d", matrix=(32, 32), coils=6, acceleration=2.0,
                                      seed=1), b)
    with h5py.File(a, "a") as fa, h5py.File(b, "r") as fb:
        fb.copy(fb["dataset"], fa, name="localizer")
    return a


def test_groups_are_listed_and_chosen(two: Path) -> None:
    assert ismrmrd_groups(two) == ["dataset", "localizer"]
    with pytest.warns(InputDataWarning, match="2 ISMRMRD datasets.*--dataset"):
        first = read_raw(two)
    assert first.n_coils == 4
    assert read_raw(two, dataset="localizer").n_coils == 6
    with pytest.raises(InputDataError, match="no ISMRMRD dataset 'nope'.*dataset, localizer"):
        read_raw(two, dataset="nope")


def test_dataset_option_on_other_formats_is_refused(tmp_path: Path, real_data: Path) -> None:
    from conftest import real_file

    with pytest.raises(ConfigError, match="for ISMRMRD files; this is a twix file"):
        read_raw(real_file(real_data, "twix_gre.dat"), dataset="dataset")


def test_cli_info_and_reconstruct_with_dataset(two: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["info", str(two)])
    assert res.exit_code == 0, res.output
    assert "localizer" in res.output and "(shown)" in res.output
    assert "--dataset" in res.output                       # the warning says how to choose
    res = runner.invoke(app, ["info", str(two), "--dataset", "localizer", "--json"])
    assert res.exit_code == 0 and '"coils": 6' in res.output
    out = tmp_path / "o.nii"
    res = runner.invoke(app, ["reconstruct", str(two), str(out), "-m", "zf", "--dataset",
                              "localizer"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["reconstruct", str(two), str(tmp_path / "x.nii"), "-m", "zf",
                              "--dataset", "nope"])
    assert res.exit_code == 1 and "localizer" in res.output
    assert not (tmp_path / "x.nii").exists()
