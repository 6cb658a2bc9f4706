"""`falconbench run`: load each scheme for real, measure memory and speed, each configuration in its own process.

Importing this package imports no torch: the measuring libraries load in the spawned worker.
"""

from .config import RunConfig, config_hash
from .orchestrator import Event, RunOutcome, run_benchmark, run_sweep
from .settings import RunSettings

__all__ = ["Event", "RunConfig", "RunOutcome", "RunSettings", "config_hash", "run_benchmark", "run_sweep"]
