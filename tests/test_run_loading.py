"""Loading and quantizing tiny Falcon (multi-query) and Llama (grouped-query) models in-process, on CPU."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

from falconbench.errors import RunError  # noqa: E402
from falconbench.planner import kv_cache_bytes as planned_kv_bytes  # noqa: E402
from falconbench.planner import weights_bytes as planned_weights_bytes  # noqa: E402
from falconbench.run import footprint, loading, worker  # noqa: E402
from falconbench.run.config import RunConfig  # noqa: E402
from falconbench.run.decode import generate_fixed, prompt_ids  # noqa: E402
from falconbench.run.trackers import CpuTracker  # noqa: E402
from falconbench.schemes import SCHEMES  # noqa: E402
from falconbench.sources import resolve_model  # noqa: E402

PLAN_TOLERANCE = 0.03


def no_sync():
    pass


def build(folder, dtype, random_weights=True):
    config = RunConfig(str(folder), dtype, random_weights=random_weights)
    return loading.load_model(config, resolve_model(str(folder)), no_sync)


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def prompt():
    return prompt_ids(256, batch=2, tokens=12, seed=0, device="cpu")


@pytest.mark.parametrize("dtype, reference", [("int8", "fp16"), ("nf4", "bf16"), ("nf4-dq", "bf16"),
                                              ("fp4", "bf16")])
def test_falcon_is_really_quantized(tiny_falcon_config, prompt, dtype, reference):
    """Every FalconLinear is replaced (the head is not), the weights shrink and the outputs move."""
    floating, quantized = build(tiny_falcon_config, reference), build(tiny_falcon_config, dtype)
    assert loading.count_quantized(floating.model) == (0, 8)
    assert loading.count_quantized(quantized.model) == (8, 8)
    assert quantized.quantized_by == {"falconbench": 8}
    assert type(quantized.model.lm_head) is torch.nn.Linear
    assert footprint.weights_bytes(quantized.model) < 0.6 * footprint.weights_bytes(floating.model)
    before, after = logits(floating.model, prompt), logits(quantized.model, prompt)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)
    assert (after - before).abs().max() < 1.0  # quantization noise, not a broken model


@pytest.mark.parametrize("model", ["tiny_falcon_config", "tiny_llama_config"])
@pytest.mark.parametrize("dtype", list(SCHEMES))
def test_planner_weights_match_the_loaded_model(model, dtype, request):
    folder = request.getfixturevalue(model)
    loaded = build(folder, dtype)
    measured = footprint.weights_bytes(loaded.model)
    planned = planned_weights_bytes(resolve_model(str(folder)).spec(), SCHEMES[dtype])
    assert abs(planned - measured) / measured <= PLAN_TOLERANCE
    # the only difference is the rotary frequency buffers (inv_freq and its copy), which are not weights
    buffers = footprint.tensor_bytes(loaded.model.buffers())
    assert measured - planned == buffers


def test_tied_head_materializes_once(tiny_falcon_config):
    model = build(tiny_falcon_config, "bf16").model
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_pretrained_falcon_gets_quantized_despite_transformers(tiny_falcon_dir, prompt):
    """transformers 5 leaves FalconLinear in 16 bits under a BitsAndBytesConfig; falconbench finishes the job."""
    floating = build(tiny_falcon_dir, "bf16", random_weights=False)
    loaded = build(tiny_falcon_dir, "nf4", random_weights=False)
    assert loading.count_quantized(loaded.model) == (8, 8)
    assert sum(loaded.quantized_by.values()) == 8 and set(loaded.seconds) == {"read", "quantize"}
    assert not torch.equal(logits(floating.model, prompt), logits(loaded.model, prompt))


def test_pretrained_llama_is_quantized_by_transformers(tiny_llama_dir):
    loaded = build(tiny_llama_dir, "int8", random_weights=False)
    assert loaded.quantized_by == {"transformers": 14, "falconbench": 0}
    assert loading.count_quantized(loaded.model) == (14, 14)


@pytest.mark.parametrize("model", ["tiny_falcon_config", "tiny_llama_config"])
def test_fixed_length_generation_and_measured_kv_cache(model, request):
    folder = request.getfixturevalue(model)
    loaded = build(folder, "bf16")
    ids = prompt_ids(256, batch=2, tokens=10, seed=0, device="cpu")
    tracker = CpuTracker()
    tracker.start()
    run = generate_fixed(loaded.model, ids, new_tokens=5, tracker=tracker)
    assert run.tokens.shape == (2, 5) and len(run.step_seconds) == 4 and run.ttft_seconds > 0
    assert footprint.cached_tokens(run.cache) == 14
    assert set(tracker.phases) == {"prefill", "decode"}
    spec = resolve_model(str(folder)).spec()
    assert footprint.kv_cache_bytes(run.cache) == planned_kv_bytes(spec, context=14, batch=2, kv_bytes=2)


def test_an_earlier_repeat_leaves_no_kv_cache_behind(tiny_falcon_config, monkeypatch):
    """Each timed run starts with no earlier run's KV cache alive, so its peaks hold one cache, not one per
    repeat; the last run's cache is still measured."""
    import weakref

    from falconbench.run import decode

    generate, caches = decode.generate_fixed, []

    def watched(model, ids, new_tokens, tracker, track=True):
        assert [ref for ref in caches if ref() is not None] == [], "an earlier run's KV cache is still alive"
        run = generate(model, ids, new_tokens, tracker, track)
        caches.append(weakref.ref(run.cache))
        return run

    monkeypatch.setattr(decode, "generate_fixed", watched)
    config = RunConfig(str(tiny_falcon_config), "bf16", random_weights=True, prompt_tokens=8, new_tokens=4,
                       repeats=3, warmup=1)
    tracker = CpuTracker()
    tracker.start()
    speed = worker.speed_phase(config, build(tiny_falcon_config, "bf16").model, tracker, lambda phase: None)
    spec = resolve_model(str(tiny_falcon_config)).spec()
    assert len(caches) == 4 and speed.kv_cache_bytes == planned_kv_bytes(spec, context=11, batch=1, kv_bytes=2)
    assert speed.prompt_kv_cache_bytes == planned_kv_bytes(spec, context=8, batch=1, kv_bytes=2)


def test_a_phase_value_missing_a_figure_fails_where_it_is_built():
    """The worker's phases return typed values: leaving a figure out fails at once, in the phase, not when the
    row is assembled in the parent."""
    from falconbench.run.measurement import SpeedMeasurement

    figures = dict(ttft_seconds={"median": 0.1}, decode_token_seconds=None, decode_tokens_per_second=None,
                   generate_seconds=None, kv_cache_bytes=10, kv_cache_tokens=5, prompt_kv_cache_bytes=6,
                   weights_bytes_after_run=100, phases={}, peak_bytes=None)
    SpeedMeasurement(**figures)
    del figures["kv_cache_bytes"]
    with pytest.raises(TypeError, match="kv_cache_bytes"):
        SpeedMeasurement(**figures)


def test_an_ok_row_missing_a_measurement_fails_where_the_row_is_built():
    """A row said to be ok must carry what makes it ok: build_row refuses one without its speed (or load), so the
    mistake surfaces in the one place rows are built, not as blank cells in a report."""
    from falconbench.results import RunResult
    from falconbench.run.measurement import Measurement, build_row

    base = RunResult(model="m", dtype="bf16", status="error")
    assert build_row(base, "oom", "ran out", Measurement({}, {})).status == "oom"  # a failure may lack them
    with pytest.raises(ValueError, match="its load is missing"):
        build_row(base, "ok", None, Measurement({}, {}))
    with pytest.raises(ValueError, match="its measurement is missing"):
        build_row(base, "ok", None, None)


def test_cpu_4bit_shape_check_names_the_layer():
    loading.check_cpu_4bit_shapes([("h.0.mlp.up", 64), ("h.0.attn.qkv", 4672)])
    with pytest.raises(RunError, match=r"multiple of 32.*not: h\.0\.attn\.qkv \(100 outputs\)\. .*on CUDA"):
        loading.check_cpu_4bit_shapes([("h.0.mlp.up", 64), ("h.0.attn.qkv", 100)])


def test_a_float_model_labelled_quantized_is_refused():
    worker.check_quantized(RunConfig("falcon-7b", "bf16"), 0, 8)
    worker.check_quantized(RunConfig("falcon-7b", "nf4"), 8, 8)
    with pytest.raises(RunError, match="only 0 of 8 linear layers"):
        worker.check_quantized(RunConfig("falcon-7b", "nf4"), 0, 8)
    with pytest.raises(RunError, match="only 7 of 8"):
        worker.check_quantized(RunConfig("falcon-7b", "int8"), 7, 8)


def test_out_of_memory_is_told_apart_from_other_errors():
    assert worker.is_oom(MemoryError())
    assert worker.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert worker.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                      "memory: you tried to allocate 1099511627776 bytes"))
    assert worker.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert worker.is_oom(RuntimeError("unable to mmap 756816 bytes from file <model.safetensors>: Cannot allocate "
                                      "memory (12)"))  # seen under --memory-cap: the weights' mapping fails first
    assert not worker.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert worker.describe(ValueError("bad\n  value")) == "ValueError: bad value"
    assert worker.describe(RunError("what. how")) == "what. how"


def test_random_weights_never_hold_the_float_model_whole(tiny_falcon_config, monkeypatch):
    """Each linear layer is quantized as soon as it is materialized, and its float weight freed before the next
    one exists (RSS is too coarse for this: the C allocator keeps freed blocks), so the float model never
    exists whole."""
    import weakref

    quantize, alive = loading.to_bnb, []

    def watched(linear, scheme, threshold):
        assert not [ref for ref in alive if ref() is not None], "an earlier float weight is still alive"
        alive.append(weakref.ref(linear.weight))
        return quantize(linear, scheme, threshold)

    monkeypatch.setattr(loading, "to_bnb", watched)
    loaded = build(tiny_falcon_config, "int8")
    assert len(alive) == 8 and all(ref() is None for ref in alive)
    assert loading.count_quantized(loaded.model) == (8, 8)


def test_a_hub_id_loads_from_the_local_cache_offline(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    repo = tmp_path / "hub" / "models--org--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model("org/tiny-llama")
    assert source.kind == "hub-cache"
    loaded = loading.load_model(RunConfig("org/tiny-llama", "nf4"), source, no_sync)
    assert loading.count_quantized(loaded.model) == (14, 14)


def test_fused_experts_are_counted_by_parameters_and_named(tmp_path):
    """A tiny Mixtral in nf4: 8 of 8 linear layers are quantized, yet most parameters stay bf16 in the fused experts.
    The guard counts parameters, names the block, and agrees with the plan."""
    from tiny_models import TINY_MIXTRAL, write_config

    folder = write_config(tmp_path / "mixtral", TINY_MIXTRAL)
    loaded = build(folder, "nf4")
    census = loading.parameter_census(loaded.model)
    spec = resolve_model(str(folder)).spec()
    assert loading.count_quantized(loaded.model) == (8, 8)  # the old guard: "fully quantized"
    assert census.params == spec.param_count
    assert census.quantized_params == worker.planned_quantized_params(RunConfig(str(folder), "nf4"),
                                                                      resolve_model(str(folder)))
    assert census.quantized_share < 0.25
    assert census.float_blocks[0][0] == "model.layers.*.mlp.experts"
    assert census.float_blocks[0][1] == spec.experts_params
    worker.check_quantized_share(RunConfig(str(folder), "nf4"), census, census.quantized_params)  # as planned
    with pytest.raises(RunError, match="model.layers.*mlp.experts"):
        worker.check_quantized_share(RunConfig(str(folder), "nf4"), census, census.params)  # more was planned
    assert footprint.weights_bytes(loaded.model) - planned_weights_bytes(spec, SCHEMES["nf4"]) == \
        footprint.tensor_bytes(loaded.model.buffers())
