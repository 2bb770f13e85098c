"""Training steps per second at 1 and 2 torch threads, alone and beside a CPU-bound process.

Run:  python benchmarks/threads_bench.py [--steps 30] [--models resnet18 mobilenetv3_small_050]

The quickstart's shapes (32 px, batch 32, 10 classes, SGD): each (model, threads) pair runs in a
fresh process, first with nothing else started by this script, then beside one
``while True: pass`` process that it starts and stops itself. This is why the quickstart and the
tests ask for ``--threads 1`` (every other command defaults to the CPUs per rank:
teacher_infer/runtime/threads.py): with the cores shared, two torch threads wait for each other
at every parallel region. On a machine that other jobs load too, report its load
(``uptime``) beside the figures.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

STEP = r"""
import sys, time, torch, timm
threads, name, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model(name, num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
def step():
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(f"{steps * 32 / (time.perf_counter() - start):.0f}")
"""


def images_per_s(threads: int, model: str, steps: int) -> str:
    out = subprocess.run([sys.executable, "-c", STEP, str(threads), model, str(steps)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv3_small_050"])
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)")
    print("| model | threads | images/s alone | images/s beside one busy process |")
    print("|---|---|---|---|")
    for model in args.models:
        for threads in (1, 2):
            alone = images_per_s(threads, model, args.steps)
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                shared = images_per_s(threads, model, args.steps)
            finally:
                busy.kill()
                busy.wait()
            print(f"| {model} | {threads} | {alone} | {shared} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
