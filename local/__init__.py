"""local: the runner - model configs and architectures, KV cache, sampling, tokenizer, generation, CLI."""

from .generate import Event, Stats
from .runner import Runner, gpu_memory_allocated, load
from .sampling import SamplingParams

__all__ = ["load", "Runner", "SamplingParams", "Event", "Stats", "gpu_memory_allocated"]
