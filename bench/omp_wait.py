"""Training steps with a thread per core, on idle cores and with one core busy, per OpenMP
wait setting: what the test suite sets (``tests/conftest.py``) and why.

    python bench/omp_wait.py [--steps 30] [--model swinv2_nano_relay] [--px 64]

Each row runs in a fresh process (libgomp reads its variables when torch loads it): the
in-process training of the tests' small models (batch 4, fp32), ms per step. "busy" is
another process spinning (``python -c "while 1: pass"``), started and stopped by this
script, as on a shared machine. A libgomp thread that waits by spinning holds its core, so
with a core taken every parallel region waits for the descheduled thread; one that sleeps
at once pays a wake-up at every region on idle cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SETTINGS = {
    "libgomp default": {},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "PASSIVE, GOMP_SPINCOUNT=10000 (the tests)": {
        "OMP_WAIT_POLICY": "PASSIVE",
        "GOMP_SPINCOUNT": "10000",
    },
    "one thread (OMP_NUM_THREADS=1)": {"OMP_NUM_THREADS": "1"},
}

STEP = """
import sys, time, torch
from relay_models import RelayLoss, create_model, train_step
steps, name, px = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = create_model(name, num_classes=6, in_chans=4)
opt, loss = torch.optim.AdamW(model.parameters(), lr=1e-3), RelayLoss()
x = lambda: torch.randn(4, 4, px, px)
batch = {"local": x(), "global": x(), "labels": torch.randint(0, 6, (4, px, px))}
for _ in range(3):
    train_step(model, batch, loss, opt)
t = time.perf_counter()
for _ in range(steps):
    train_step(model, batch, loss, opt)
print((time.perf_counter() - t) / steps * 1000)
"""


def _ms(env: dict[str, str], args: argparse.Namespace) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(args.steps), args.model, str(args.px)],
        env={**clean, **env},
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--model", default="swinv2_nano_relay")
    p.add_argument("--px", type=int, default=64)
    args = p.parse_args()
    idle = {name: _ms(env, args) for name, env in SETTINGS.items()}
    spinner = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        busy = {name: _ms(env, args) for name, env in SETTINGS.items()}
    finally:
        spinner.kill()  # the pid this script holds
        spinner.wait()
    print(f"# {args.model}, {args.px} px, batch 4, fp32; {os.cpu_count()} CPUs; ms per step\n")
    print("| OpenMP setting | idle cores | one core busy | busy / idle |")
    print("|---|---:|---:|---:|")
    for name in SETTINGS:
        print(f"| {name} | {idle[name]:.0f} | {busy[name]:.0f} | {busy[name] / idle[name]:.1f}x |")


if __name__ == "__main__":
    main()
