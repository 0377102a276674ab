"""Realistic raw multicoil Cartesian k-space simulated from real anatomy."""

from __future__ import annotations

from .anatomy import (
    SPLITS,
    AnatomySource,
    AnatomySubject,
    Split,
    anatomy_available,
    anatomy_extent,
    anatomy_source,
    anatomy_sources,
    anatomy_subjects,
    head_extent,
    load_anatomy,
)
from .kspace import (
    EXAMPLE_MATRIX,
    ORIENTATIONS,
    AnatomyTransform,
    DatasetEntry,
    DatasetResult,
    SimulatedScan,
    SimulationConfig,
    dataset_plan,
    simulate,
    simulate_dataset,
    simulate_to_file,
    simulated_example,
)

__all__ = [
    "EXAMPLE_MATRIX", "ORIENTATIONS", "SPLITS", "AnatomySource", "AnatomySubject",
    "AnatomyTransform", "DatasetEntry", "DatasetResult", "SimulatedScan", "SimulationConfig",
    "Split", "anatomy_available", "anatomy_extent", "anatomy_source", "anatomy_sources",
    "anatomy_subjects", "dataset_plan", "head_extent", "load_anatomy", "simulate",
    "simulate_dataset", "simulate_to_file", "simulated_example",
]
