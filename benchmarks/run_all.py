"""Every benchmark of the project, one after the other (`make bench`).

Set TRL_PYTHON to the interpreter of a virtual environment with trl 1.12 to time its PPOTrainer beside overopt's PPO
(see benchmarks/bench_trl_ppo.py).
"""

import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script in ("bench_bon.py", "bench_tiny_study.py", "bench_scoring.py", "bench_ppo.py", "bench_data_parallel.py"):
    print(f"\n===== {script}")
    trl = ["--trl-python", os.environ["TRL_PYTHON"]] if script == "bench_ppo.py" and "TRL_PYTHON" in os.environ else []
    sys.argv = [str(HERE / script), *trl]
    runpy.run_path(str(HERE / script), run_name="__main__")
