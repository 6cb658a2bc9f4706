"""falconbench: plan and measure the memory, speed and quality of Falcon-class LLMs in every precision."""

from .api import fit, plan, read_results, run_benchmark
from .errors import ConfigError, FalconbenchError, ModelNotFoundError, UsageError
from .finetune import FinetuneRow, FinetuneSetup, plan_finetune, plan_finetune_point
from .finetune_fit import FinetuneFitResult, fit_finetune
from .fit import FitResult, FitRow
from .gpus import GPU, get_gpu, gpu_profiles
from .planner import PlanRow, kv_cache_bytes, plan_point, weights_bytes
from .results import ReadProblem, RunResult
from .schemes import SCHEMES, Scheme, get_scheme
from .sources import ModelSource, resolve_model
from .spec import ArchSpec, Linear, spec_from_config

__version__ = "0.1.0"


def __getattr__(name: str):
    # NOTE: the run and report paths (multiprocessing, the worker, plotting) load only when asked for, so
    # `import falconbench.planner` and `falconbench plan` stay light.
    if name == "write_report":
        from .report import write_report

        return write_report
    if name == "RunOutcome":
        from .run import RunOutcome

        return RunOutcome
    if name == "run_finetune":
        from .train.sweep import run_finetune

        return run_finetune
    raise AttributeError(f"module 'falconbench' has no attribute {name!r}")


__all__ = [
    "ArchSpec", "ConfigError", "FalconbenchError", "GPU", "Linear", "ModelNotFoundError", "ModelSource",
    "PlanRow", "SCHEMES", "Scheme", "UsageError", "get_gpu", "get_scheme", "gpu_profiles", "kv_cache_bytes",
    "FitResult", "FitRow", "ReadProblem", "RunOutcome", "RunResult", "fit", "plan", "plan_point", "read_results",
    "resolve_model",
    "run_benchmark", "spec_from_config", "weights_bytes", "write_report",
    "FinetuneFitResult", "FinetuneRow", "FinetuneSetup", "fit_finetune", "plan_finetune", "plan_finetune_point",
    "run_finetune",
]
