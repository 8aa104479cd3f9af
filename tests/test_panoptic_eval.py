"""PQ: a hand-computed case (crowd and VOID included), equality with panopticapi, the evaluator's files."""
import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

import datasets.panoptic_eval as panoptic_eval_module
from datasets import shapes
from datasets.coco_panoptic import id_to_rgb, rgb_to_id
from datasets.panoptic_eval import PanopticEvaluator, pq_compute

CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
              {"id": 3, "name": "s", "isthing": 0}]


def _write(folder, json_path, annotations, id_maps, categories=None):
    folder.mkdir(parents=True, exist_ok=True)
    for ann, ids in zip(annotations, id_maps):
        Image.fromarray(id_to_rgb(ids)).save(folder / ann["file_name"])
    data = {"annotations": annotations}
    if categories is not None:
        data["categories"] = categories
        data["images"] = [{"id": a["image_id"], "file_name": f"{a['image_id']}.jpg"} for a in annotations]
    json_path.write_text(json.dumps(data))


@pytest.fixture()
def hand_case(tmp_path):
    """10x10 image.

    ground truth: 1 (cat a) rows 0-3 x cols 0-4 (20 px); 4 (cat b) row 5 x cols 0-4 (5 px);
    2 (cat b, crowd) rows 6-9 x cols 0-4 (20 px); 3 (stuff s) cols 5-9 (50 px); VOID row 4 x cols 0-4.
    prediction: 10 (a) rows 0-4 x cols 0-3: 16 px on gt 1 and 4 on VOID -> IoU 16 / (20 + 20 - 16 - 4) = 0.8;
    11 (b) rows 6-9 x cols 0-2: inside the crowd of b -> ignored; 12 (s) cols 6-9: IoU 40 / 50 = 0.8;
    13 (a) col 5: a false positive; gt 4 is missed (false negative); the rest is VOID.
    """
    gt = np.zeros((10, 10), np.int64)
    gt[0:4, 0:5], gt[5, 0:5], gt[6:10, 0:5], gt[:, 5:10] = 1, 4, 2, 3
    pred = np.zeros((10, 10), np.int64)
    pred[0:5, 0:4], pred[6:10, 0:3], pred[:, 6:10], pred[:, 5] = 10, 11, 12, 13
    gt_segments = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 20}, {"id": 2, "category_id": 2, "iscrowd": 1, "area": 20},
                   {"id": 3, "category_id": 3, "iscrowd": 0, "area": 50}, {"id": 4, "category_id": 2, "iscrowd": 0, "area": 5}]
    pred_segments = [{"id": 10, "category_id": 1}, {"id": 11, "category_id": 2}, {"id": 12, "category_id": 3},
                     {"id": 13, "category_id": 1}]
    _write(tmp_path / "gt", tmp_path / "gt.json", [{"image_id": 1, "file_name": "1.png", "segments_info": gt_segments}],
           [gt], CATEGORIES)
    _write(tmp_path / "pred", tmp_path / "pred.json",
           [{"image_id": 1, "file_name": "1.png", "segments_info": pred_segments}], [pred])
    return tmp_path


def _panopticapi(gt_json, pred_json, gt_folder, pred_folder):
    from panopticapi.evaluation import pq_compute as reference

    with contextlib.redirect_stdout(io.StringIO()):
        return reference(str(gt_json), str(pred_json), gt_folder=str(gt_folder), pred_folder=str(pred_folder))


def _assert_same(result, reference):
    for name in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq", "n"):
            assert result[name][key] == pytest.approx(reference[name][key], abs=1e-12), (name, key)
    for category, values in reference["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert result["per_class"][category][key] == pytest.approx(values[key], abs=1e-12)


def test_hand_computed_pq_with_crowd_and_void(hand_case):
    result = pq_compute(hand_case / "gt.json", hand_case / "pred.json", hand_case / "gt", hand_case / "pred")
    # per class: a tp 1 (0.8) fp 1 -> PQ 0.8/1.5; b fn 1 -> 0; s tp 1 (0.8) -> 0.8
    assert result["per_class"][1]["pq"] == pytest.approx(0.8 / 1.5)
    assert result["per_class"][1]["sq"] == pytest.approx(0.8) and result["per_class"][1]["rq"] == pytest.approx(1 / 1.5)
    assert result["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert result["Things"]["pq"] == pytest.approx(0.8 / 1.5 / 2) and result["Things"]["n"] == 2
    assert result["Things"]["sq"] == pytest.approx(0.4) and result["Things"]["rq"] == pytest.approx(1 / 3)
    assert result["Stuff"] == pytest.approx({"pq": 0.8, "sq": 0.8, "rq": 1.0, "n": 1})
    assert result["All"]["pq"] == pytest.approx((0.8 / 1.5 + 0.8) / 3) and result["All"]["n"] == 3
    _assert_same(result, _panopticapi(hand_case / "gt.json", hand_case / "pred.json", hand_case / "gt", hand_case / "pred"))


def _perturb(ids, segments, rng):
    """A plausible prediction from a ground-truth id map: shifted, relabelled, one segment lost, some VOID."""
    pred = np.roll(ids, shift=int(rng.integers(-2, 3)), axis=1)
    pred[rng.random(ids.shape) < 0.03] = 0
    infos = []
    for k, seg in enumerate(segments):
        category = seg["category_id"]
        if k == 2:
            pred[pred == seg["id"]] = 0  # missed
            continue
        if k == 3:
            category = 1 + category % 3  # wrong thing class
        new_id = seg["id"] + 7
        pred[pred == seg["id"]] = new_id
        infos.append({"id": new_id, "category_id": category})
    present = set(np.unique(pred).tolist())
    return pred, [i for i in infos if i["id"] in present]


def test_equals_panopticapi_on_shapes(tmp_path):
    root = shapes.ensure_shapes(tmp_path / "shapes", train_size=1, val_size=12, image_size=64)
    gt_json = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    for ann in gt_json["annotations"][::3]:  # some crowd ground truth
        ann["segments_info"][-1]["iscrowd"] = 1
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    rng = np.random.default_rng(0)
    annotations, maps = [], []
    for ann in gt_json["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(root / "panoptic_val2017" / ann["file_name"])))
        pred, infos = _perturb(ids, ann["segments_info"], rng)
        annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": infos})
        maps.append(pred)
    _write(tmp_path / "pred", tmp_path / "pred.json", annotations, maps)
    args = (tmp_path / "gt.json", tmp_path / "pred.json", root / "panoptic_val2017", tmp_path / "pred")
    result = pq_compute(*args)
    assert 0.2 < result["All"]["pq"] < 0.95 and result["Things"]["n"] == 3 and result["Stuff"]["n"] == 2
    _assert_same(result, _panopticapi(*args))


def test_evaluator_writes_pngs_and_json_and_counts_each_image_once(hand_case, monkeypatch):
    out = hand_case / "run" / "panoptic_eval"
    evaluator = PanopticEvaluator(hand_case / "gt.json", hand_case / "gt", output_dir=out)
    pred_info = json.loads((hand_case / "pred.json").read_text())["annotations"][0]
    prediction = {"png_string": (hand_case / "pred" / "1.png").read_bytes(), "segments_info": pred_info["segments_info"],
                  "image_id": 1, "file_name": "000000000001.png"}
    evaluator.update([dict(prediction)])
    # another rank evaluated image 1 again (padded sampler): it must not count twice
    monkeypatch.setattr(panoptic_eval_module, "_gather", lambda obj: [obj, [dict(obj[0])]])
    evaluator.synchronize_between_processes()
    assert len(evaluator.predictions) == 1
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = evaluator.summarize()
    assert (out / "000000000001.png").read_bytes() == prediction["png_string"]
    written = json.loads((out / "predictions.json").read_text())
    assert written["annotations"][0]["image_id"] == 1 and "png_string" not in written["annotations"][0]
    assert result["All"]["pq"] == pytest.approx((0.8 / 1.5 + 0.8) / 3)
    assert "Things" in printed.getvalue()


def test_segment_missing_from_png_or_json_is_reported(hand_case):
    pred = json.loads((hand_case / "pred.json").read_text())
    pred["annotations"][0]["segments_info"].pop()  # segment 13 is drawn but not listed
    (hand_case / "pred.json").write_text(json.dumps(pred))
    with pytest.raises(KeyError, match="segment 13 is in the predicted PNG"):
        pq_compute(hand_case / "gt.json", hand_case / "pred.json", hand_case / "gt", hand_case / "pred")
