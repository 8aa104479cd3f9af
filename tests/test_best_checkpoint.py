"""checkpoint_best.pth: written (atomically) only when an evaluation beats every earlier one of the run.

main.evaluate is wrapped so each epoch's box AP comes from a script (a tiny model scores ~0 on
every epoch); everything else is the real run. The best survives --resume (it is in checkpoint.pth).
"""
import json

import pytest

import main
from util.checkpoint import load_checkpoint

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "2", "--shapes_val_size", "2",
        "--batch_size", "2", "--print_freq", "100", "--num_workers", "0"]


@pytest.fixture
def scripted(monkeypatch):
    """Box AP per evaluation from a list; records (name, epoch of the checkpoint) of every save."""
    aps, saves = [], []
    real_evaluate, real_save = main.evaluate, main.save_checkpoint

    def evaluate(*args, **kwargs):
        stats, evaluator = real_evaluate(*args, **kwargs)
        stats["coco_eval_bbox"] = [aps.pop(0)] + stats["coco_eval_bbox"][1:]
        return stats, evaluator

    def save_checkpoint(obj, path):
        saves.append((path.name, obj.get("epoch")))
        real_save(obj, path)

    monkeypatch.setattr(main, "evaluate", evaluate)
    monkeypatch.setattr(main, "save_checkpoint", save_checkpoint)
    return aps, saves


def _run(tmp_path, out, epochs, *extra):
    main.main(main.get_args_parser().parse_args(
        [*TINY, "--data_path", str(tmp_path / "shapes"), "--output_dir", str(out), "--epochs", str(epochs), *extra]))


def test_written_on_improvement_only_and_kept_across_resume(tmp_path, scripted, capsys):
    aps, saves = scripted
    out = tmp_path / "run"
    aps += [0.3, 0.1, 0.5]
    _run(tmp_path, out, 3)
    assert [epoch for name, epoch in saves if name == "checkpoint_best.pth"] == [0, 2]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("New best")]
    assert printed == ["New best bbox AP 0.3000 at epoch 0: checkpoint_best.pth",
                       "New best bbox AP 0.5000 at epoch 2 (was 0.3000 at epoch 0): checkpoint_best.pth"]
    best = load_checkpoint(out / "checkpoint_best.pth")
    assert best["epoch"] == 2 and best["best"] == {"metric": "bbox AP", "value": 0.5, "epoch": 2}
    assert best["model"].keys() == load_checkpoint(out / "checkpoint.pth")["model"].keys()
    assert "optimizer" not in best and best["args"].epochs == 3  # weights for predict.py / --finetune
    logged = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [(r["test_best_bbox_AP"], r["test_best_epoch"]) for r in logged] == [(0.3, 0), (0.3, 0), (0.5, 2)]

    # Resumed: 0.4 < 0.5 from before the restart, so no write; a tie is no improvement either.
    saves.clear()
    aps += [0.4, 0.5]
    _run(tmp_path, out, 5, "--resume", "auto")
    assert [name for name, _ in saves if name == "checkpoint_best.pth"] == []
    assert load_checkpoint(out / "checkpoint_best.pth")["epoch"] == 2
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["test_best_epoch"] == 2


def test_no_evaluation_no_best(tmp_path, scripted):
    _, saves = scripted
    _run(tmp_path, tmp_path / "run", 1, "--eval_every", "0")
    assert [name for name, _ in saves] == ["checkpoint.pth"]
    assert "test_best" not in (tmp_path / "run" / "log.txt").read_text()


def test_selection_metric_prefers_pq_for_panoptic():
    assert main._selection_metric({"coco_eval_bbox": [0.2] + [0.0] * 11}) == ("bbox AP", 0.2)
    assert main._selection_metric({"coco_eval_bbox": [0.2] + [0.0] * 11, "PQ_all": {"pq": 0.7}}) == ("PQ", 0.7)
    assert main._selection_metric({"loss": 1.0}) is None
