"""How the reports write numbers (report.md, ablations.md, `splitnet bench`): one rule each."""
from __future__ import annotations


def pct(x, spread=None, unit: str = "%") -> str:
    """A fraction in percent, one decimal: pct(0.312) "31.2%"; "-" for None; with a seed spread and
    no unit (the ablation table's cells), pct(0.312, 0.005, unit="") "31.2 +/- 0.5"."""
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + (f" +/- {100 * spread:.1f}" if spread else "") + unit
