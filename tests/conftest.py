import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (layouts.py, nvidia_pickle.py) import by name
