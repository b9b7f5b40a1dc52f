"""Helpers of scripts/eval_cell_detection.py: one-to-one matching and recall per maturation stage."""

from __future__ import annotations

import numpy as np
import pytest

from tests._scripts import load_script


@pytest.fixture(scope="module")
def ev():
    return load_script("eval_cell_detection")


def test_matched_truth_is_one_to_one_within_the_radius(ev):
    truth = np.array([[10.0, 10.0], [10.0, 30.0], [50.0, 50.0]])
    # two detections near the first cell, one 3 px from the second, none near the third
    pred = np.array([[11.0, 10.0], [10.0, 12.0], [13.0, 30.0]])
    found = ev.matched_truth(pred, truth, 4.0)
    assert found.tolist() == [True, True, False]
    assert ev.match(pred, truth, 4.0) == 2
    # the same detections, a radius too small for the second cell
    assert ev.matched_truth(pred, truth, 2.5).tolist() == [True, False, False]
    assert not ev.matched_truth(np.zeros((0, 2)), truth, 4.0).any()


def test_stage_recall_counts_cells_and_finds_per_stage(ev):
    stages = np.array(["band", "band", "myelocyte", "band", "lymphocyte"], dtype=object)
    found = np.array([True, False, True, False, False])
    assert ev.stage_recall(stages, found) == {"band": (3, 1), "lymphocyte": (1, 0), "myelocyte": (1, 1)}
