"""Third-party output is silenced without importing the libraries: a command that stops at its
config does not pay for diffusers and transformers, and they are quiet once a stage loads them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

PROBE = """
import logging, sys
from pipelines.output import quiet_libraries
quiet_libraries()
before = sorted(m for m in ("diffusers", "transformers") if m in sys.modules)
from diffusers.utils import logging as dlog
from transformers.utils import logging as tlog
print(before, dlog.get_verbosity() == logging.ERROR, tlog.get_verbosity() == logging.ERROR,
      tlog.is_progress_bar_enabled())
"""


def test_quiet_before_import_sets_what_the_libraries_read_when_imported():
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY",
                                                                "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[] True True False"


def test_quiet_after_import_tells_the_libraries_directly():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from pipelines.output import quiet_libraries

    dlog.set_verbosity_info()
    tlog.set_verbosity_info()
    try:
        quiet_libraries()
        assert dlog.get_verbosity() == logging.ERROR and tlog.get_verbosity() == logging.ERROR
    finally:
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
