"""Fine-tuning from a checkpoint trained for another class count or number of queries.

The original's users deleted `class_embed.*` and `query_embed.weight` from a COCO checkpoint and
loaded it with `strict=False`, which also silently skipped anything else that did not fit.
`adapt_for_finetune` does the same re-initialisation on purpose and refuses everything else.
"""
from __future__ import annotations

import torch

# Tensors whose first dimension depends on the task, not on the architecture: the class head
# has num_classes + 1 rows, the query embedding one row per query. Matched on the last two name
# parts so that a mask model's nested `detr.class_embed.weight` qualifies too.
_TASK_SHAPED = {("class_embed", "weight"), ("class_embed", "bias"), ("query_embed", "weight"),
                ("group_query_embed", "weight")}


def _is_task_shaped(name: str, ckpt_shape: torch.Size, model_shape: torch.Size) -> bool:
    """True when `name` is a class-head or query tensor differing only in its first dimension."""
    parts = tuple(name.split(".")[-2:])
    return (parts in _TASK_SHAPED and len(ckpt_shape) == len(model_shape)
            and ckpt_shape[1:] == model_shape[1:])


def adapt_for_finetune(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Make a checkpoint's state dict loadable (strictly) into `model` for fine-tuning.

    In: `model` freshly built (its parameters are the fresh initialisation), `state_dict` the
    checkpoint's 'model' entry. Out: (new state dict, names of the re-initialised tensors in
    the model's order). A tensor is re-initialised (the model's own value is used) only when it
    is `class_embed.weight/bias` or `query_embed.weight` and differs from the model in its
    first dimension alone (another class count, another number of queries). Every other tensor
    is the checkpoint's, unchanged. BatchNorm `num_batches_tracked` counters may be absent on
    either side (frozen vs trainable BatchNorm): the model's are kept, extra ones dropped.
    Raises ValueError listing every other difference (name, checkpoint shape, model shape;
    missing and unexpected names), e.g. another backbone, width or layer count.
    """
    model_state = model.state_dict()
    reinitialised: list[str] = []
    problems: list[str] = []
    adapted: dict[str, torch.Tensor] = {}
    for name, model_tensor in model_state.items():
        if name not in state_dict and name.endswith("num_batches_tracked"):
            # BatchNorm step counters: absent from frozen-BN checkpoints and never used by DETR.
            adapted[name] = model_tensor
            continue
        if name not in state_dict:
            problems.append(f"{name}: missing from the checkpoint (model shape {list(model_tensor.shape)})")
            continue
        ckpt_tensor = state_dict[name]
        if ckpt_tensor.shape == model_tensor.shape:
            adapted[name] = ckpt_tensor
        elif _is_task_shaped(name, ckpt_tensor.shape, model_tensor.shape):
            adapted[name] = model_tensor.detach().clone()
            reinitialised.append(name)
        else:
            problems.append(f"{name}: checkpoint shape {list(ckpt_tensor.shape)}, "
                            f"model shape {list(model_tensor.shape)}")
    for name in state_dict:
        if name not in model_state and not name.endswith("num_batches_tracked"):
            problems.append(f"{name}: in the checkpoint but not in the model "
                            f"(checkpoint shape {list(state_dict[name].shape)})")
    if problems:
        raise ValueError(
            f"--finetune: the checkpoint does not fit this architecture in {len(problems)} tensor(s) "
            "(only the class head and the query embedding may differ; match --backbone, "
            "--dilation, --hidden_dim, --dim_feedforward, --enc_layers, --dec_layers, --masks "
            "to the checkpoint):\n  " + "\n  ".join(problems)
        )
    return adapted, reinitialised
