"""falconbench: plan and measure the memory, speed and quality of Falcon-class LLMs in every precision."""

from .errors import ConfigError, FalconbenchError, ModelNotFoundError, UsageError
from .fit import FitResult, FitRow, fit
from .gpus import GPU, get_gpu, gpu_profiles
from .planner import PlanRow, kv_cache_bytes, plan, plan_point, weights_bytes
from .results import RunResult, read_results
from .schemes import SCHEMES, Scheme, get_scheme
from .sources import ModelSource, resolve_model
from .spec import ArchSpec, Linear, spec_from_config

__version__ = "0.1.0"


def __getattr__(name: str):
    # NOTE: the run and report paths (multiprocessing, the worker, plotting) load only when asked for, so
    # `import falconbench.planner` and `falconbench plan` stay light.
    if name == "run_benchmark":
        from .run import run_benchmark

        return run_benchmark
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(f"module 'falconbench' has no attribute {name!r}")

__all__ = [
    "ArchSpec", "ConfigError", "FalconbenchError", "GPU", "Linear", "ModelNotFoundError", "ModelSource",
    "PlanRow", "SCHEMES", "Scheme", "UsageError", "get_gpu", "get_scheme", "gpu_profiles", "kv_cache_bytes",
    "FitResult", "FitRow", "RunResult", "fit", "plan", "plan_point", "read_results", "resolve_model",
    "run_benchmark", "spec_from_config", "weights_bytes", "write_report",
]
