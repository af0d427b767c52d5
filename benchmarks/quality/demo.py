"""``ssm-hub demo`` with its defaults, as the README's first command runs it, on the CPU: what it prints, and its wall
time. The source of the README's demo block.

    python benchmarks/quality/demo.py            # writes benchmarks/results/demo/cpu_<N>cores.{json,md}

The demo budgets every stage in steps and seeds everything, so the printed quality numbers are the same on a busy
machine as on an idle one (up to float noise); the wall time and the speed ratios are timings and are not.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import result_stem, results_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    from ssm_hub.conversion.distillation.distill import report_lines
    from ssm_hub.demo import run_demo

    printed = []

    def log(line: str) -> None:
        printed.append(line)
        print(line, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = run_demo(str(Path(folder) / "ssm-hub-demo"), log=log)
    seconds = time.perf_counter() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    cores = os.cpu_count()
    report = {"benchmark": "demo", "commit": commit, "cores": cores, "torch_threads": torch.get_num_threads(),
              "python": platform.python_version(), "torch": torch.__version__, "wall_seconds": seconds,
              "result": {key: value for key, value in result.items() if key != "output_dir"}, "printed": printed}
    table = report_lines({"evaluations": result["evaluations"], "speed": result["speed"]})
    markdown = (f"`ssm-hub demo` (no arguments) at {commit} on {cores} CPU cores: {seconds / 60:.1f} minutes.\n\n"
                "```\n" + "\n".join(table) + "\n```\n\n"
                f"Greedy completion of the reloaded student: {result['completion']!r}\n")
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem("cpu", f"{cores}cores")
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / f"{stem}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
