"""Exact resume: 2 epochs straight == 1 epoch + --resume + 1 epoch, bit for bit, on CPU.

main.py reseeds every random stream (Python, NumPy, torch, the sampler, the DataLoader's worker
seeds) from (seed, rank, epoch) at the start of each epoch, so this holds with --num_workers 0
and with worker processes (the same count on both sides). Dropout is on (0.1) so the torch
stream matters too.
"""
import pytest
import torch

import main
from util.checkpoint import load_checkpoint

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "6", "--shapes_val_size", "2",
        "--batch_size", "2", "--print_freq", "100", "--eval_every", "0", "--lr_backbone", "1e-4"]


def _train(data, out, workers, epochs, resume=None):
    flags = [*TINY, "--data_path", str(data), "--num_workers", str(workers), "--epochs", str(epochs),
             "--output_dir", str(out)]
    if resume:
        flags += ["--resume", str(resume)]
    main.main(main.get_args_parser().parse_args(flags))
    return load_checkpoint(out / "checkpoint.pth")


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_two_epochs_equal_one_plus_resume_plus_one(tmp_path, workers):
    data = tmp_path / "shapes"
    straight = _train(data, tmp_path / "straight", workers, epochs=2)
    first = _train(data, tmp_path / "split", workers, epochs=1)
    resumed = _train(data, tmp_path / "split", workers, epochs=2, resume=tmp_path / "split" / "checkpoint.pth")

    assert (straight["epoch"], first["epoch"], resumed["epoch"]) == (1, 0, 1)
    # the first epoch really changed the weights, so equality below is not trivial
    assert not torch.equal(first["model"]["class_embed.weight"], straight["model"]["class_embed.weight"])
    _assert_identical(straight["model"], resumed["model"])
    for param_id, state in straight["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][param_id][name]), (param_id, name)
    assert straight["lr_scheduler"] == resumed["lr_scheduler"]

