"""Where the experiment files (the top-level experiments/ folder of the repository) are.

experiments/ in the repository is the one source of truth; a wheel ships a copy of it as data files
(setup.cfg [options.data_files]: PREFIX/share/splitnet/experiments), so `reproduce` and `ablate` work
from a non-editable install too. Looked up in this order:
  1. $SPLITNET_EXPERIMENTS, when set (even if wrong: an explicit choice is never silently replaced,
     and the error then names the path the user gave);
  2. the source checkout this module runs from (editable install, PYTHONPATH=src);
  3. the copy installed with the package (sys.prefix, or the user base for `pip install --user`).
"""
from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

ENV = "SPLITNET_EXPERIMENTS"
INSTALLED = Path("share") / "splitnet" / "experiments"  # relative to the install prefix; see setup.cfg
# Returned when nothing is found, so that every "file not found" error built on it names the variable
# to set (report.py and ablate.py resolve the folder at import and report a missing file when used).
NOT_FOUND = Path(f"<set {ENV} to the experiments folder of a splitnet checkout>")


def _candidates() -> list:
    source = Path(__file__).resolve().parents[3] / "experiments"  # src/splitnet/experiments/locate.py
    prefixes = [sysconfig.get_path("data"), sys.prefix, site.getuserbase()]
    return [source] + [Path(p) / INSTALLED for p in dict.fromkeys(prefixes) if p]


def experiments_dir() -> Path:
    """The experiments folder ($SPLITNET_EXPERIMENTS, else the checkout's, else the installed copy);
    NOT_FOUND (a path naming the variable) when there is none."""
    explicit = os.environ.get(ENV)
    if explicit:
        return Path(explicit).expanduser()
    for path in _candidates():
        if (path / "ablations").is_dir():
            return path
    return NOT_FOUND


def require_experiments_dir() -> Path:
    """experiments_dir(), or a one-line FileNotFoundError saying what to set."""
    path = experiments_dir()
    if not path.is_dir():
        where = f"{ENV}={path} is not a folder" if os.environ.get(ENV) else "no experiments folder found"
        raise FileNotFoundError(f"{where}: set {ENV} to the experiments/ folder of a splitnet checkout "
                                f"(or install splitnet from a checkout)")
    return path
