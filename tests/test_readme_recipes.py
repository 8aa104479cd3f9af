"""The README's two shapes recipes are the ones benchmarks/convergence.py measures, flag for flag,
and the fast one keeps the issue's form: Group DETR on, at most half the plain recipe's epochs."""
import re
from pathlib import Path

from benchmarks.convergence import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            match = re.search(r"python main\.py (--dataset_file shapes .*)$", line.strip())
            if match:
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


def test_readme_recipes_are_the_benchmarked_ones():
    commands = [_flags(c) for c in _readme_commands()]
    assert _flags(RECIPES["plain"]) in commands
    assert _flags(RECIPES["fast"]) in commands


def test_fast_recipe_is_group_detr_in_at_most_half_the_epochs():
    plain, fast = _flags(RECIPES["plain"]), _flags(RECIPES["fast"])
    assert int(fast["--group_detr"]) > 1
    assert int(fast["--epochs"]) * 2 <= int(plain["--epochs"])
    # the same model at inference: every architecture flag equal
    for flag in ("--backbone", "--hidden_dim", "--enc_layers", "--dec_layers", "--dim_feedforward",
                 "--num_queries", "--image_scale", "--shapes_train_size"):
        assert fast[flag] == plain[flag], flag
