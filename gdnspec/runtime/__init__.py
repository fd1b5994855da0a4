"""Runtime helpers for accelerators: static-shape, host-sync-free decode and speculative steps, captured in CUDA graphs."""
from gdnspec.runtime.static import StaticDecoder, StaticEagleBegin, StaticPrefill, StaticSpecRunner, batch_bucket

__all__ = ["StaticDecoder", "StaticEagleBegin", "StaticPrefill", "StaticSpecRunner", "batch_bucket"]
