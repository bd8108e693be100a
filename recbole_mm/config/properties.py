"""Where recbole-mm's YAML defaults live."""

from pathlib import Path


def properties_dir() -> Path:
    """``properties/`` of a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "properties", here.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"recbole-mm's properties/ folder is missing (looked in {here} and {here.parent})")
