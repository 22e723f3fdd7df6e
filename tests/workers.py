"""Running a test worker in a fresh Python process and reading its result.

Multi-device and multi-process tests configure devices (or
`jax.distributed`) before the framework starts, so their training runs in
`python -m tests.<worker> ...`; a worker prints one line
`RESULT <json>` at its end.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment():
    """This process's environment, without a device count of its own."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def result_of(returncode, stdout, stderr):
    """The worker's `RESULT` JSON; fails with its stderr if there is none."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert returncode == 0 and lines, stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def run(module, *args, timeout=600):
    """Runs `python -m tests.<module> args...`; returns its `RESULT`."""
    completed = subprocess.run(
        [sys.executable, "-m", f"tests.{module}", *map(str, args)],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result_of(completed.returncode, completed.stdout, completed.stderr)
