"""A small public surface: ``import attune`` gives the app developer's names and every error,
each subpackage's ``__all__`` is sorted and importable, and the README's Python imports only
``attune`` and runs as written."""

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import attune
from attune.shared import errors

ROOT = Path(__file__).resolve().parents[1]


def test_attune_exports_the_app_names_and_every_error():
    exported = set(attune.__all__)
    assert {"Personalizer", "Event", "EventContext", "PrivacyConfig", "ModelConfig", "PrivacyReport",
            "Retention", "Status", "StoredEvent", "Support"} <= exported
    raised = {name for name, value in vars(errors).items() if inspect.isclass(value)
              and issubclass(value, errors.AttuneError)}
    assert raised <= exported


def test_every_all_is_sorted_and_importable():
    for name in ("attune", "attune.client", "attune.server", "attune.shared"):
        module = importlib.import_module(name)
        assert module.__all__ == sorted(module.__all__)
        for symbol in module.__all__:
            assert getattr(module, symbol) is not None


def test_the_readme_python_imports_attune_only():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            if line.startswith(("import ", "from ")) and "attune" in line:
                assert re.match(r"(from attune import|import attune$)", line), line


def test_the_readme_python_runs_as_written(tmp_path):
    """The app developer's examples, run in order as one script, in a fresh folder."""
    readme = (ROOT / "README.md").read_text()
    script = tmp_path / "readme.py"
    script.write_text("\n".join(re.findall(r"```python\n(.*?)```", readme, flags=re.S)))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "epsilon 0.00 of 8.00" in result.stdout
    assert (tmp_path / "app-data" / "scorer.pt2").stat().st_size > 0
    assert not (tmp_path / "app-data" / "attune.sqlite").exists()  # destroyed at the end
