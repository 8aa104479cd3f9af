"""The README's demo-architecture training lines are recipes tools/convergence.py measures, flag for
flag (data and output flags aside), and the measured fast recipe keeps the issue's form: Group DETR
on, at most half the plain recipe's epochs, boxes only, the same model at inference."""
import re
from pathlib import Path

from tools.convergence import MODEL, RECIPES

ROOT = Path(__file__).resolve().parents[1]
# Where the data comes from and where the run goes: the harness sets these per variant and run.
DATA_FLAGS = {"--dataset_file", "--data_path", "--shapes_train_size", "--shapes_val_size", "--shapes_image_size",
              "--train_images", "--train_annotations", "--val_images", "--val_annotations", "--output_dir",
              "--finetune", "--seed"}


def _readme_demo_commands() -> list:
    """Every `python main.py ...` line of the README's bash blocks that trains the demo architecture."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"python main\.py (.*)$", line.strip())
            if match and "--backbone resnet18" in match.group(1) and "--eval" not in match.group(1).split():
                commands.append(match.group(1))
    return commands


def _flags(command: str) -> dict:
    parts = command.split()
    flags, i = {}, 0
    while i < len(parts):
        if i + 1 < len(parts) and not parts[i + 1].startswith("--"):
            flags[parts[i]] = parts[i + 1]
            i += 2
        else:
            flags[parts[i]] = True
            i += 1
    return flags


def _training_flags(command: str) -> dict:
    return {k: v for k, v in _flags(command).items() if k not in DATA_FLAGS}


def _measured(scenario: str, name: str) -> dict:
    return _flags(f"{MODEL} {RECIPES[scenario][name]}")


def test_readme_demo_lines_are_measured_recipes():
    commands = _readme_demo_commands()
    assert commands, "no demo training line found in README.md"
    measured = [_measured(s, n) for s in RECIPES for n in RECIPES[s]]
    for command in commands:
        flags = _training_flags(command)
        assert flags in measured, f"README line not measured by tools/convergence.py: {command}"
    assert _measured("scratch", "plain") in [_training_flags(c) for c in commands]


def test_fast_recipe_is_group_detr_in_at_most_half_the_epochs_on_boxes_only():
    plain, fast = _measured("scratch", "plain"), _measured("scratch", "fast")
    assert int(fast["--group_detr"]) > 1
    assert int(fast["--epochs"]) * 2 <= int(plain["--epochs"])
    assert "--copy_paste" not in fast and "--masks" not in fast  # runs on data without polygons (YOLO, boxes-only COCO)
    for name in RECIPES["finetune"]:  # fine-tuning: at most 12 epochs, the demo architecture
        assert int(_measured("finetune", name)["--epochs"]) <= 12
