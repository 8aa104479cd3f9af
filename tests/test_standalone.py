"""The repository stands alone: no tracked file names the folder holding the checkout, the
user's home directory, or the `shared` folder that sat next to the development checkout."""
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[Path]:
    """Files under version control; without git (an unpacked archive), every file outside hidden
    folders and caches."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(ROOT).parts)]


# Folders every machine has, which docs may name on purpose (`--out /tmp/shapes`): a checkout
# cloned straight into one of them does not make them development paths.
_SHARED_SYSTEM_FOLDERS = {Path("/tmp"), Path("/var/tmp"), Path(tempfile.gettempdir()), Path("/home")}


def _checked_folders() -> set[Path]:
    return {f for f in {ROOT.parent, Path.home()}
            if f != Path(f.anchor) and f not in _SHARED_SYSTEM_FOLDERS}  # "/" alone would match every path


def _forbidden_patterns() -> list[re.Pattern]:
    # Built at run time so that this file does not name them itself.
    patterns = [re.compile(re.escape(".." + "/" + "shared"))]
    for folder in _checked_folders():
        # The folder as a whole path component: /a/b matches /a/b/x but not /a/bc.
        patterns.append(re.compile(re.escape(str(folder)) + r"(?![\w.-])"))
    return patterns


def test_no_tracked_file_names_a_development_path():
    files = _tracked_files()
    assert any(p.name == "main.py" for p in files)
    patterns = _forbidden_patterns()
    offending = []
    for path in files:
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in patterns):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "paths of the development machine in tracked files:\n" + "\n".join(offending)


def test_the_check_sees_a_development_path():
    """The patterns catch what they are for (so an empty result above means something)."""
    patterns = _forbidden_patterns()
    assert any(p.search('SPEC = Path("' + ".." + '/shared/spec")') for p in patterns)
    if ROOT.parent in _checked_folders():
        assert any(p.search(f"open('{ROOT.parent}/shared/x.tsv')") for p in patterns)
        assert not any(p.search(f"{ROOT.parent}wards") for p in patterns)
