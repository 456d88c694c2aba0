"""The memory sampler of `bench scale` sees a command's own peak and its workers' by role."""

from __future__ import annotations

import subprocess
import sys

from pipelines.bench.scale import TreeMemory

CHILD = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(300 * 2**20); time.sleep(1.5)"])
a = bytearray(150 * 2**20)
time.sleep(1.5)
worker.wait()
"""


def test_peaks_of_the_driver_and_its_descendants():
    proc = subprocess.Popen([sys.executable, "-c", CHILD])
    with TreeMemory(proc.pid, period_s=0.05) as memory:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert memory.peak_mb["driver"] >= 150  # its own 150 MB
    assert memory.peak_mb["other"] >= 300  # the worker it started, counted apart
