import sys
from pathlib import Path

# Tests import helpers (dit_reference) that live beside them.
sys.path.insert(0, str(Path(__file__).parent))
