"""Every benchmark of the project, one after the other (`make bench`)."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script in ("bench_bon.py", "bench_tiny_study.py"):
    print(f"\n===== {script}")
    sys.argv = [str(HERE / script)]
    runpy.run_path(str(HERE / script), run_name="__main__")
