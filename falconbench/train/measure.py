"""Real training steps on a real model, measured per component beside the plan (`falconbench.finetune`).

lora and qlora go through peft (`LoraConfig`, `get_peft_model`; qlora after `prepare_model_for_kbit_training` on a
bitsandbytes 4-bit base); full fine-tuning trains every parameter, in fp32 under `torch.autocast` for a 16-bit
dtype. The batch is the same tokens of the shipped text each step, so the loss falling over the steps shows that
the gradients reach the trained weights. Warmup steps first, then timed steps; the first timed step is counted
tensor by tensor (weights, gradients, optimizer state, saved activations and logits) and every phase's peak
memory is read from the device tracker (CUDA: torch's allocator; CPU: the process's RSS).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..finetune import ADAPTER_BYTES_PER_PARAM, FinetuneSetup, get_optimizer
from ..planner import DEVICES, check_positive
from ..run.footprint import bnb_state_tensors, tensor_bytes
from .ledger import SavedTensorLedger

LEARNING_RATE = 1e-3  # large enough that a few steps on one batch move the loss visibly


@dataclass(frozen=True)
class StepSettings:
    """How many steps to run, and on what."""

    steps: int = 3
    warmup: int = 1
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        check_positive("steps (--repeats)", self.steps)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise UsageError(f"warmup must be a whole number of steps (0 or more), got {self.warmup!r}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}. Choose from: {', '.join(DEVICES)}")


def load_base(folder: Path, setup: FinetuneSetup, device: str):
    """The base model in the setup's dtype (a bitsandbytes 4-bit base for qlora), on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..run import loading

    scheme = setup.scheme
    if setup.method == "qlora":
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=device,
                                                     quantization_config=loading.bnb_config(scheme, 6.0))
        loading.quantize_remaining(model, scheme, 6.0)  # transformers 5 leaves FalconLinear unquantized
        return model
    dtype = torch.float32 if setup.method == "full" else loading.torch_dtype(scheme.torch_dtype)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device)


def prepare(model, setup: FinetuneSetup):
    """peft adapters (lora, qlora) or every parameter trainable (full), and gradient checkpointing if asked."""
    checkpointing = {"use_reentrant": True}  # transformers' default, and what prepare_model_for_kbit_training uses
    if setup.method == "full":
        model.requires_grad_(True)
        if setup.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if setup.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()  # a frozen embedding's output must carry grad through the checkpoints
    targets = list(setup.lora_targets) if setup.lora_targets else None
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0, bias="none",
                        target_modules=targets, task_type="CAUSAL_LM", fan_in_fan_out=uses_conv1d(model))
    return get_peft_model(model, config)


def uses_conv1d(model) -> bool:
    """Whether the model's linears are transformers' Conv1D (GPT-2 style, weight stored in × out), which LoRA must
    adapt with fan_in_fan_out=True (peft's LoraConfig docstring). NOTE: peft flips the flag itself, with a warning,
    for a Conv1D target; saying it up front keeps the run's log clean. A 4-bit base has no Conv1D left (bitsandbytes
    replaced them with Linear4bit, in nn.Linear's layout), so qlora stays at False, as peft expects there."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(module, Conv1D) for module in model.modules())


def make_optimizer(setup: FinetuneSetup, params: list):
    import torch

    name = get_optimizer(setup.optimizer).name
    if name == "adamw":
        return torch.optim.AdamW(params, lr=LEARNING_RATE)
    if name == "sgd":
        return torch.optim.SGD(params, lr=LEARNING_RATE)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged-adamw-8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=LEARNING_RATE)


def text_tokens(folder: Path, text_path: Path):
    """The text's token ids by the model's tokenizer; a folder without one (the tiny test models, vocabulary 256)
    reads the text as UTF-8 bytes."""
    import torch

    text = text_path.read_text(encoding="utf-8")
    if not any(Path(folder).glob("tokenizer*")):
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long), "utf-8 bytes"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(text, return_tensors="pt").input_ids[0], "model tokenizer"


def training_batch(ids, setup: FinetuneSetup, vocab_size: int, device: str):
    """`batch` consecutive windows of `seq_len` tokens of the text, and labels shifted as transformers shifts them."""
    import torch

    needed = setup.seq_len * setup.batch
    if ids.numel() < needed:
        ids = ids.repeat(-(-needed // ids.numel()))
    input_ids = (ids[:needed] % vocab_size).view(setup.batch, setup.seq_len).to(device)
    # ForCausalLMLoss: pad the labels by one ignored position and shift them, never the logits (no copy of them).
    labels = torch.nn.functional.pad(input_ids, (0, 1), value=-100)[:, 1:].contiguous()
    return input_ids, labels


def moment_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (moments, 8-bit states and their absmax); the step
    counters and bitsandbytes' shared code maps are bookkeeping, not per-parameter state."""
    names = ("exp_avg", "exp_avg_sq", "momentum_buffer", "state1", "state2", "absmax1", "absmax2")
    return tensor_bytes(state[n] for state in optimizer.state.values() for n in names if n in state)


def frozen_bytes(model) -> int:
    """Frozen parameters, buffers and bitsandbytes' quantization state, each storage once."""
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    tensors += [t for m in model.modules() for t in bnb_state_tensors(m)]
    return tensor_bytes(tensors)


def measure_finetune(folder: Path, setup: FinetuneSetup, settings: StepSettings, text_path: Path,
                     tracker: Any = None, output_dir: Path | None = None) -> dict[str, Any]:
    """Train for warmup + timed steps and return the measured row's fields."""
    import torch

    torch.manual_seed(settings.seed)
    device = settings.device
    model = prepare(load_base(Path(folder), setup, device), setup)
    model.train()
    vocab = model.get_output_embeddings().weight.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(setup, params)
    ids, tokens_from = text_tokens(folder, text_path)
    input_ids, labels = training_batch(ids, setup, vocab, device)
    copy_dtype = torch.bfloat16 if setup.dtype == "bf16" else torch.float16
    autocast = (lambda: torch.autocast(device_type=device, dtype=copy_dtype)) if setup.mixed_precision \
        else nullcontext
    fields: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params),
                              "frozen_weights_bytes": frozen_bytes(model), "trainable_bytes": tensor_bytes(params), "tokens_from": tokens_from}
    losses, seconds = [], []
    for step in range(settings.warmup + settings.steps):
        counted = step == settings.warmup
        ledger = SavedTensorLedger(model, copy_dtype if setup.mixed_precision else None) if counted else None
        loss, step_seconds = train_step(model, optimizer, input_ids, labels, autocast, ledger, tracker, fields)
        losses.append(loss)
        if step >= settings.warmup:
            seconds.append(step_seconds)
        if counted:
            fields["optimizer_bytes"] = moment_bytes(optimizer)
    fields["notes"] = run_notes(setup, device)
    tokens = setup.seq_len * setup.batch
    fields.update(losses=losses, step_seconds=seconds, seconds_per_step=sum(seconds) / len(seconds),
                  tokens_per_second=tokens * len(seconds) / sum(seconds), loss_fell=losses[-1] < losses[0])
    if setup.adapters and output_dir is not None:
        fields.update(save_adapter(model, output_dir))
    return fields


def run_notes(setup: FinetuneSetup, device: str) -> list[str]:
    """What a reader of the row must know about how this device ran it."""
    notes = []
    if setup.method == "qlora":
        notes.append(f"bitsandbytes 4-bit forward and backward ran on {device}")
    optimizer = get_optimizer(setup.optimizer)
    if optimizer.paged and device == "cpu":
        notes.append("paged optimizer on CPU: bitsandbytes keeps its state as ordinary tensors (no managed memory)")
    if device == "cpu":
        notes.append("peaks are the process's RSS (CPU has no allocator counter); components are counted per tensor")
    return notes


def train_step(model, optimizer, input_ids, labels, autocast, ledger, tracker, fields) -> tuple[float, float]:
    """One forward, backward and optimizer step; with a ledger, the saved tensors and gradients are counted."""
    import torch

    begin = tracker.begin if tracker and ledger else (lambda phase: None)
    end = tracker.end if tracker and ledger else (lambda phase: None)
    sync = tracker.synchronize if tracker else (lambda: None)
    sync()
    start = time.perf_counter()
    begin("forward")
    with ledger.recording("forward") if ledger else nullcontext(), autocast():
        logits = model(input_ids=input_ids).logits
        with ledger.saving_as("logits") if ledger else nullcontext():
            upcast = logits.float()
            loss = torch.nn.functional.cross_entropy(upcast.view(-1, upcast.shape[-1]), labels.view(-1),
                                                     ignore_index=-100)
    end("forward")
    if ledger:
        saved = ledger.bytes_by_category()
        fields.update(activation_bytes=saved["activation"], weight_copy_bytes=saved["weight_copy"],
                      logits_bytes=saved["logits"] + logits.untyped_storage().nbytes())
        upcast.register_hook(lambda grad: fields.__setitem__("logits_grad_bytes", grad.untyped_storage().nbytes()))
    del logits, upcast
    begin("backward")
    with ledger.recording("backward") if ledger else nullcontext():
        loss.backward()
    end("backward")
    if ledger:
        fields["recompute_bytes"] = ledger.backward_peak
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        fields["gradient_bytes"] = tensor_bytes(grads)
    begin("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end("optimizer")
    sync()
    return float(loss.detach()), time.perf_counter() - start


def save_adapter(model, output_dir: Path) -> dict[str, Any]:
    """Save the adapter with peft and read back its size: the file, and its tensor bytes without the header
    (safetensors: an 8-byte little-endian header length, the JSON header, then the tensor data)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir))
    path = output_dir / "adapter_model.safetensors"
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = 8 + int.from_bytes(handle.read(8), "little")
    return {"adapter_file_bytes": size, "adapter_header_bytes": header, "adapter_bytes": size - header,
            "adapter_dtype_bytes": ADAPTER_BYTES_PER_PARAM}
