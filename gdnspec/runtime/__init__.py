"""Runtime helpers for accelerators: static-shape, host-sync-free decode and speculative steps, captured in CUDA graphs."""
from gdnspec.runtime.static import StaticDecoder, StaticSpecRunner, batch_bucket

__all__ = ["StaticDecoder", "StaticSpecRunner", "batch_bucket"]
