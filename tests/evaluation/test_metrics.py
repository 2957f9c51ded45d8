"""CL metrics against matrices computed by hand (docs/design.md §7)."""

import pytest

from cl_bench.evaluation.metrics import (
    average_anytime_accuracy,
    average_performance,
    backward_transfer,
    compute_cl_metrics,
    final_performance,
    forgetting,
    forgetting_from_peak,
    forward_transfer,
    weighted_final_accuracy,
)

# T = 3; row 0 = before training.
R = [
    [10.0, 20.0, 30.0],
    [80.0, 25.0, 35.0],
    [60.0, 90.0, 40.0],
    [50.0, 70.0, 95.0],
]


def test_by_hand():
    assert average_performance(R) == pytest.approx((80 + 90 + 95) / 3)
    assert final_performance(R) == pytest.approx((50 + 70 + 95) / 3)
    assert forgetting(R) == pytest.approx((80 + 90 + 95) / 3 - (50 + 70 + 95) / 3)
    # BWT over j < T: (50-80) and (70-90)
    assert backward_transfer(R) == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    # FWT over j >= 2: R[1,2]-R[0,2] = 25-20, R[2,3]-R[0,3] = 40-30
    assert forward_transfer(R) == pytest.approx(((25 - 20) + (40 - 30)) / 2)
    # FR: task1 peak over rows 1..2 = 80 -> 80-50; task2 peak over row 2 = 90 -> 90-70
    assert forgetting_from_peak(R) == pytest.approx(((80 - 50) + (90 - 70)) / 2)
    assert weighted_final_accuracy(R, [1, 1, 2]) == pytest.approx((50 + 70 + 2 * 95) / 4)
    # AAA: mean of [80], [60, 90], [50, 70, 95]
    assert average_anytime_accuracy(R) == pytest.approx((80 + 75 + 215 / 3) / 3)


def test_fr_uses_peak_not_diagonal():
    # Task 1 improves after stage 1 (peak 95 at stage 2): FR measures from the peak, BWT from R[1,1].
    R2 = [[0.0, 0.0], [60.0, 0.0], [40.0, 90.0]]
    assert forgetting_from_peak(R2) == pytest.approx(20.0)
    assert backward_transfer(R2) == pytest.approx(-20.0)
    R3 = [[0, 0, 0], [60, 0, 0], [95, 50, 0], [70, 50, 80]]
    assert forgetting_from_peak(R3) == pytest.approx(((95 - 70) + (50 - 50)) / 2)


def test_missing_cells_give_none_not_partial_means():
    lower = [[None, None], [70.0, None], [50.0, 80.0]]
    m = compute_cl_metrics(lower, [10, 10])
    assert m["AP"] == pytest.approx(75.0) and m["FP"] == pytest.approx(65.0)
    assert m["FWT"] is None  # needs row 0 and the upper triangle
    incomplete = [[0.0, 0.0], [70.0, 10.0], [None, 80.0]]
    assert compute_cl_metrics(incomplete, [1, 1])["FP"] is None


def test_single_task_has_no_transfer_terms():
    m = compute_cl_metrics([[5.0], [90.0]], [3])
    assert m["AP"] == 90.0 and m["Fgt"] == 0.0
    assert m["BWT"] is None and m["FWT"] is None and m["FR"] is None


def test_malformed_matrix_is_an_error():
    with pytest.raises(ValueError, match="T\\+1 rows"):
        average_performance([[1.0, 2.0], [3.0, 4.0]])
