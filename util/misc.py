"""The original's `util.misc` names, re-exported from their homes so old imports keep working.

New code imports from the home modules: util.nested_tensor, util.distributed, util.metric_logger.
"""
from torch.nn.functional import interpolate  # the original's shim for old torchvision; torch's own now

from util.distributed import (all_gather, get_rank, get_world_size, init_distributed_mode,
                              is_dist_avail_and_initialized, is_main_process, reduce_dict,
                              save_on_master, setup_for_distributed)
from util.metric_logger import MetricLogger, SmoothedValue, accuracy
from util.nested_tensor import NestedTensor, collate_fn, nested_tensor_from_tensor_list

__all__ = [
    "NestedTensor", "nested_tensor_from_tensor_list", "collate_fn",
    "init_distributed_mode", "is_dist_avail_and_initialized", "get_rank", "get_world_size",
    "is_main_process", "all_gather", "reduce_dict", "save_on_master", "setup_for_distributed",
    "MetricLogger", "SmoothedValue", "accuracy", "interpolate",
]
