"""Mask evaluation at full COCO size fits in memory: batch of 2, 800x1066 and 800x1201, R50 panoptic model.

Runs in a fresh process so its peak RSS (ru_maxrss) is this work's alone. PostProcessSegm
upsamples one image and a few queries at a time; the peak is set by the model's forward pass.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, resource, torch
import hubconf
from models.detr import PostProcess
from models.segmentation import PostProcessSegm

torch.manual_seed(0)
model = hubconf.detr_resnet50_panoptic(pretrained=False).eval()
images = [torch.randn(3, 800, 1066), torch.randn(3, 800, 1201)]
processed = torch.tensor([[800, 1066], [800, 1201]])
original = torch.tensor([[480, 640], [426, 640]])
with torch.inference_mode():
    outputs = model(images)
    results = PostProcessSegm()(PostProcess()(outputs, original), outputs, original, processed)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "masks": [list(r["masks"].shape) for r in results],
                  "pred_masks": list(outputs["pred_masks"].shape)}))
"""


def test_full_size_mask_evaluation_of_a_batch_of_two_fits_in_memory():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["pred_masks"] == [2, 100, 200, 301]  # 1/4 of the padded batch
    assert report["masks"] == [[100, 1, 480, 640], [100, 1, 426, 640]]  # each at its original size
    assert report["peak_mib"] < 8 * 1024, f"peak RSS {report['peak_mib']:.0f} MiB"
