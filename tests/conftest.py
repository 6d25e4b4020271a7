"""Shared test setup.

TRITON_INTERPRET=1 must be set before triton is imported anywhere, so that Triton kernels run
on CPU under the interpreter (the GPU tests skip without CUDA instead).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
