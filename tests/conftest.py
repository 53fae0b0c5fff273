import sys
from pathlib import Path

# The tests import their independent reference network (tests/reference.py) by name.
sys.path.insert(0, str(Path(__file__).parent))
