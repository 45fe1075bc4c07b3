"""The report table shows every figure the evaluations wrote: the R@K of ``eval.ranks``, mAP,
mINP and, with ``eval.verification``, TPR at FPR and EER."""

from __future__ import annotations

from clipid.config import Params
from clipid.stages.report import report_table


def test_the_columns_follow_the_figures_in_the_metrics():
    inshop = {"R1": 0.5, "R10": 0.7, "R20": 0.8, "R30": 0.85, "R40": 0.9, "R50": 0.95,
              "mAP": 0.4, "mINP": 0.1, "TPR_at_FPR_1e-4": 0.2, "TPR_at_FPR_1e-3": 0.3,
              "TPR_at_FPR_1e-2": 0.6, "EER": 0.05, "EER_std": 0.01}
    metrics = {"stage1": {"i2i": inshop, "t2i": {"R1": 0.25, "mAP": 0.2, "mINP": 0.125}},
               "stage2": {"i2i": {"R1": 0.5, "mAP": 0.4, "mINP": 0.2}}}
    header, rule, first, second = report_table(Params(), ["stage1", "stage2"],
                                               metrics).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")][2:]
    assert columns == ["i2i R1", "i2i R10", "i2i R20", "i2i R30", "i2i R40", "i2i R50",
                       "i2i mAP", "i2i mINP", "i2i TPR@FPR 1e-4", "i2i TPR@FPR 1e-3",
                       "i2i TPR@FPR 1e-2", "i2i EER", "t2i R1", "t2i mAP", "t2i mINP"]
    assert rule.count("---:") == len(columns)
    cells = [c.strip() for c in first.strip("|").split("|")][2:]
    assert cells[7:] == ["10.0", "20.0", "30.0", "60.0", "5.0 ± 1.0", "25.0", "20.0", "12.5"]
    # A stage without verification shows a dash where the figure is missing.
    assert [c.strip() for c in second.strip("|").split("|")][2:][8:12] == ["–"] * 4
