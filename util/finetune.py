"""Fine-tuning from a checkpoint trained for another class count or number of queries.

The original's users deleted `class_embed.*` and `query_embed.weight` from a COCO checkpoint and
loaded it with `strict=False`, which also silently skipped anything else that did not fit.
`adapt_for_finetune` does the same re-initialisation on purpose and refuses everything else.

Options that help a re-initialised head learn new classes (off by default; any run may use them):
`param_groups` gives the class head and the queries their own learning rate (--head_lr_mult),
`init_class_prior` starts the class logits at a prior (--class_prior) instead of uniform, and
`set_frozen` holds the backbone still for the first epochs (--freeze_backbone_epochs).
"""
from __future__ import annotations

import math
from typing import Iterable

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


def is_head_parameter(name: str) -> bool:
    """True for the class head and the query embeddings (the task-shaped tensors), nested or not."""
    return tuple(name.split(".")[-2:]) in _TASK_SHAPED


def param_groups(named: list[tuple[str, torch.nn.Parameter]], lr_backbone: float,
                 head_lr: float | None = None) -> list[dict]:
    """AdamW parameter groups of the trainable `named` parameters.

    [everything else (lr = the optimizer's --lr), backbone (lr_backbone)], as the original; with
    `head_lr`, a third group: the class head and query embeddings at head_lr (taken out of the first).
    The groups depend on names only, so a --resume rebuilds the same ones.
    """
    head = [p for n, p in named if head_lr is not None and "backbone" not in n and is_head_parameter(n)]
    head_ids = {id(p) for p in head}
    groups = [
        {"params": [p for n, p in named if "backbone" not in n and id(p) not in head_ids]},
        {"params": [p for n, p in named if "backbone" in n], "lr": lr_backbone},
    ]
    if head_lr is not None:
        groups.append({"params": head, "lr": head_lr})
    return groups


def init_class_prior(model: torch.nn.Module, prior: float, category_ids: Iterable[int]) -> list[str]:
    """Set the bias of every class head (`*class_embed`, num_classes + 1 outputs, the last one
    "no object") so that, before training, a query's softmax is about: no object 1 - prior, each
    of the dataset's `category_ids` prior / their count, ids with no category 1e-6.

    DETR has a softmax with a no-object class rather than focal loss's sigmoids, so the prior is
    the share of queries that find an object (objects per image / --num_queries is a fair value):
    a fresh head then starts near the answer most queries need instead of at a uniform guess.
    Returns the names of the biases set. Raises ValueError for a prior outside (0, 1).
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"--class_prior {prior}: the share of queries that find an object must be in (0, 1), "
                         "e.g. objects per image / --num_queries; 0 = off")
    ids = sorted(set(int(i) for i in category_ids))
    done = []
    for name, module in model.named_modules():
        if name.split(".")[-1] != "class_embed" or not isinstance(module, torch.nn.Linear):
            continue
        num_classes = module.out_features - 1
        present = [i for i in ids if 0 <= i < num_classes] or list(range(num_classes))
        bias = torch.full((module.out_features,), math.log(1e-6))
        bias[present] = math.log(prior / len(present))
        bias[-1] = math.log(1.0 - prior)
        with torch.no_grad():
            module.bias.copy_(bias.to(module.bias.dtype))
        done.append(f"{name}.bias")
    return done


def set_frozen(params: Iterable[torch.nn.Parameter], frozen: bool) -> None:
    """requires_grad off (frozen) or on for `params`: a frozen parameter gets no gradient, so the
    optimizer skips it (unchanged, no Adam state update) and the backward pass stops before it."""
    for p in params:
        p.requires_grad_(not frozen)
