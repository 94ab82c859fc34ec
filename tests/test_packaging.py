"""The wheel carries every subpackage (setuptools silently drops unlisted ones)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_every_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("attune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("attune", "client", "server", "shared", "simulations"):
        for module in (ROOT / folder).rglob("*.py"):
            relative = module.relative_to(ROOT / folder).as_posix()
            inside = f"attune/{relative}" if folder == "attune" else f"attune/{folder}/{relative}"
            assert inside in names, f"{module} missing from the wheel"
    assert not any(n.startswith("attune/tests") or n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "attune = attune.simulations.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
