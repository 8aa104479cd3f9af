"""--ema DECAY: the weight average's arithmetic, and what a run with it writes."""
import json

import pytest
import torch
from torch import nn

import main
from models import build_model
from util.checkpoint import load_checkpoint, load_model_state
from util.ema import ModelEMA


def test_average_follows_the_warmed_up_decay():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.train()(torch.randn(4, 3))  # moves the BatchNorm running statistics and counter
        ema.update()
        d = min(0.9, step / (9 + step))
        for k, v in model.state_dict().items():
            expected[k] = expected[k] * d + v * (1 - d) if v.is_floating_point() else v.clone()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6, msg=k)
    assert ema.module.state_dict()["1.num_batches_tracked"] == 29  # integers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="--ema"):
        ModelEMA(nn.Linear(2, 2), 1.0)


def test_resume_restores_the_average():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, 0.99)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1)
        ema.update()
    other = ModelEMA(nn.Linear(2, 2), 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3
    torch.testing.assert_close(other.module.weight, ema.module.weight)


TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "8", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "4",
        "--shapes_val_size", "2", "--batch_size", "2", "--print_freq", "100"]


@pytest.fixture(scope="module")
def grouped_ema_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grouped_ema")
    out = tmp / "run"
    args = main.get_args_parser().parse_args([*TINY, "--data_path", str(tmp / "shapes"), "--epochs", "2",
                                              "--group_detr", "3", "--ema", "0.9", "--output_dir", str(out)])
    main.main(args)
    return tmp, out


def test_run_logs_and_saves_the_average(grouped_ema_run):
    _, out = grouped_ema_run
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [len(line["test_ema_coco_eval_bbox"]) for line in lines] == [12, 12]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["ema"]["updates"] == 4  # 2 epochs x 2 iterations
    ema_ckpt = load_checkpoint(out / "checkpoint_ema.pth")
    assert ema_ckpt["model"].keys() == ckpt["model"].keys()
    assert any(not torch.equal(ema_ckpt["model"][k], ckpt["model"][k]) for k in ckpt["model"])


def test_the_average_does_not_change_the_trained_weights(grouped_ema_run):
    """The fast line dropped --ema on this ground: a run without it trains bit for bit the same weights."""
    tmp, out = grouped_ema_run
    plain_out = tmp / "run_without_ema"
    args = main.get_args_parser().parse_args([*TINY, "--data_path", str(tmp / "shapes"), "--epochs", "2",
                                              "--group_detr", "3", "--output_dir", str(plain_out)])
    main.main(args)
    with_ema, without = load_checkpoint(out / "checkpoint.pth"), load_checkpoint(plain_out / "checkpoint.pth")
    assert "ema" not in without and not (plain_out / "checkpoint_ema.pth").exists()
    assert with_ema["model"].keys() == without["model"].keys()
    for key, tensor in with_ema["model"].items():
        assert torch.equal(tensor, without["model"][key]), key
    losses = [[json.loads(line)["train_loss"] for line in (run / "log.txt").read_text().splitlines()]
              for run in (out, plain_out)]
    assert losses[0] == losses[1]


def test_grouped_ema_checkpoint_evaluates_as_a_plain_model(grouped_ema_run, capsys):
    """--eval (no --group_detr) on the EMA checkpoint of a K=3 run: the groups are left out with a note."""
    tmp, out = grouped_ema_run
    args = main.get_args_parser().parse_args([*TINY, "--data_path", str(tmp / "shapes"), "--eval",
                                              "--resume", str(out / "checkpoint_ema.pth")])
    stats = main.main(args)
    assert len(stats["coco_eval_bbox"]) == 12
    assert "left out group_query_embed.weight" in capsys.readouterr().out


def test_resume_with_another_group_count_is_refused(grouped_ema_run):
    tmp, out = grouped_ema_run
    args = main.get_args_parser().parse_args([*TINY, "--data_path", str(tmp / "shapes"), "--epochs", "3",
                                              "--resume", str(out / "checkpoint.pth")])
    with pytest.raises(Exception, match="--group_detr 3"):
        main.main(args)


def test_finetune_from_a_grouped_checkpoint_into_a_plain_model(grouped_ema_run):
    tmp, out = grouped_ema_run
    args = main.get_args_parser().parse_args(TINY + ["--data_path", str(tmp / "shapes")])
    args.num_classes, args.thing_ids = 4, None
    model, _, _ = build_model(args)
    state = load_checkpoint(out / "checkpoint.pth")["model"]
    load_model_state(model, state, what="grouped")
    torch.testing.assert_close(model.query_embed.weight, state["query_embed.weight"])
    args = main.get_args_parser().parse_args([*TINY, "--data_path", str(tmp / "shapes"), "--epochs", "1",
                                              "--eval_every", "0", "--finetune", str(out / "checkpoint.pth"),
                                              "--output_dir", str(tmp / "ft")])
    main.main(args)
    assert "group_query_embed.weight" not in load_checkpoint(tmp / "ft" / "checkpoint.pth")["model"]
