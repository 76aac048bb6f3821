"""Leave-one-out test of the planner's default efficiency against published pretraining runs.

For each record of cost/published.yaml (or --published FILE), predict its MFU from the other records
of its chip family with each method (the old constant 0.45, the family median, a line in
log10(params)) and print the table, the mean absolute error per method overall and per family, and
the default each family gets. No compute: it runs in a second anywhere.

    python benchmarks/calibration_loo.py [--published FILE]
"""

from __future__ import annotations

import argparse
import statistics

from anychip.cost import calibration
from anychip.cost.hardware import format_columns


def family_errors(rows: list[dict]) -> str:
    """Mean absolute error per family and method: where a method wins or loses."""
    out = [("family", "records") + calibration.FIT_METHODS]
    for fam in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == fam]
        errs = calibration.loo_errors(mine)
        out.append((fam, str(len(mine))) + tuple(f"{errs[m]:.3f}" for m in calibration.FIT_METHODS))
    return format_columns(out, left={0})


def defaults(evidence: calibration.Evidence) -> str:
    """The default efficiency each family gets (DEFAULT_FIT), with its spread."""
    out = [("family", "chips with records", "records", "default", "min", "max")]
    for fam in dict.fromkeys(evidence.family(r.chip) for r in evidence.records):
        fit = evidence.fit(fam)
        assert fit is not None
        out.append((fam, "/".join(fit.chips), str(fit.n), f"{fit.predict(None):.3f}", f"{fit.lo:.3f}", f"{fit.hi:.3f}"))
    return format_columns(out, left={0, 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--published", help="a records file in cost/published.yaml's format (default: the shipped one)")
    args = ap.parse_args()
    evidence = calibration.load_published(args.published) if args.published else calibration.published_evidence()
    rows = calibration.leave_one_out(evidence)
    print(calibration.format_loo_table(rows))
    errs = calibration.loo_errors(rows)
    worst = {m: max(abs(r[m] - r["published"]) for r in rows) for m in calibration.FIT_METHODS}
    print(f"\nleave-one-out over {len(rows)} records ({len(evidence.records)} in all; a family's only record "
          "cannot be left out):")
    for m in calibration.FIT_METHODS:
        mark = "  <- planner default" if m == calibration.DEFAULT_FIT else ""
        print(f"  {m:<9}  mean |error| {errs[m]:.3f}  median {statistics.median(abs(r[m] - r['published']) for r in rows):.3f}"
              f"  worst {worst[m]:.3f}  (MFU, fraction of peak){mark}")
    print("\nper family, mean |error|:\n" + family_errors(rows))
    print(f"\ndefault efficiency per family ({calibration.DEFAULT_FIT}):\n" + defaults(evidence))


if __name__ == "__main__":
    main()
