"""Optional speed paths for models built by models/: they swap faster parts into a built model
(folded frozen BatchNorm, fused ResNet layers, Winograd convolutions, kept buffers, CPU dropout and
attention shortcuts, ONNX Runtime) and keep its numbers up to fp32 rounding. models/ never imports
this package."""
from fast.allocator import retain_freed_memory
from fast.channels_last import to_channels_last
from fast.folding import fold_frozen_batchnorm
from fast.inference import optimize_for_inference
from fast.training import optimize_for_training

__all__ = ["fold_frozen_batchnorm", "optimize_for_inference", "optimize_for_training", "retain_freed_memory",
           "to_channels_last"]
