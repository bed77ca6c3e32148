"""scripts/gain_table.py: the gain over the warm start and its t-interval, from a summary.csv."""

import csv

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def gt():
    return load_script("gain_table")


def test_gain_and_interval_by_hand(tmp_path, gt):
    keys = ["kind", "method", "seed", "eval/greedy_pass@1", "trust_region/kept_frac",
            "trust_region/epoch_0/masked_frac/bucket_1", "trust_region/epoch_0/abs_diff_mean/bucket_1"]
    rows = [["warm_start", "warm_start", "", 0.5, "", "", ""],
            ["run", "a", 0, 0.6, 0.99, 0.02, 0.03], ["run", "a", 1, 0.7, 0.97, 0.04, 0.05],
            ["run", "b", 0, 0.5, 1.0, 0.0, 0.01]]
    with open(tmp_path / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        w.writerows(rows)
    table = gt.gain_table(gt._rows(tmp_path))
    # a: gains 0.1 and 0.2 -> mean 0.15, sd 0.0707, t(0.975, 1) = 12.706 -> half-width 0.635
    assert "| a | 2 | 0.650 | +0.150 [-0.485, +0.785] |" in table
    assert "| b | 1 | 0.500 | +0.000 [+nan, +nan] |" in table
    assert "| 0.9800 |" in table
    assert "| a | nan / nan | 0.0300 / 0.0400 |" in gt.bucket_table(gt._rows(tmp_path))
    m, lo, hi = gt.mean_ci([1.0, 2.0, 3.0])
    assert (m, round(lo, 4), round(hi, 4)) == (2.0, round(2 - 4.302653 / 3 ** 0.5, 4), round(2 + 4.302653 / 3 ** 0.5, 4))
