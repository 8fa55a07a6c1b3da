"""Benchmark: LoRA fine-tuning speed of the embedded SmolLM2-135M on this machine (`selfcorrect train`).

Workload: correction-format rows like the `cct` recipe's (a question, a first answer, a correction prompt,
and the target reply as the completion), generated here, trained for a fixed number of steps with the
trainer's defaults (LoRA r 16 on the attention and MLP projections, batch 8, float32 on the CPU). The rate
is the training card's: input tokens of the training steps per second of training (loading the model and
writing the adapter are not counted).

    python bench/train_bench.py [--steps N]

The last lines have the form `name: value`, ending with `train_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
from pathlib import Path

from selfcorrect.train.trainer import train


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def correction_rows(count: int) -> list[dict]:
    rows = []
    for n in range(count):
        a, b = 17 + 7 * n, 23 + 5 * n
        question = f"Compute {a} + {b}. End your reply with 'The answer is N.'"
        rows.append({
            "prompt": [{"role": "user", "content": question},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b + 1}. The answer is {a + b + 1}."},
                       {"role": "user", "content": "Review your previous answer and find problems with your answer. "
                                                   "Then give your final answer."}],
            "completion": [{"role": "assistant", "content": f"Adding again: {a} + {b} = {a + b}. I made an error "
                                                            f"before. The answer is {a + b}."}],
            "source": {"recipe": "cct", "part": "cst", "run": "bench", "item": str(n), "sample": 0, "round": 1,
                       "question_sha256": hashlib.sha256(question.encode()).hexdigest()},
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps of 8 rows (default 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "rows.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in correction_rows(8 * args.steps)))
        card = train(data, "embedded", Path(folder) / "adapter", max_steps=args.steps, save_steps=args.steps)
    print(f"cpu: {cpu_model()}")
    print(f"steps: {card['training']['steps']} of {card['hyperparameters']['batch_size']} rows")
    print(f"trained_tokens: {card['trained_tokens']}")
    print(f"seconds: {card['seconds']:.1f}")
    print(f"train_tokens_per_s: {card['tokens_per_second']:.0f}")


if __name__ == "__main__":
    main()
