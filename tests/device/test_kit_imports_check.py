"""The pre-flight import check sees what the device would lack (GPU run 3: every forced tool call
failed there on a module the kit did not carry, which this machine has)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "device"))

import kit_imports_check


def test_a_module_of_a_distribution_neither_in_the_image_nor_carried_is_missing(
    tmp_path: Path,
) -> None:
    image = tmp_path / "image.txt"
    image.write_text("# names only\nPyYAML\n")
    ok, report = kit_imports_check.check_imports(tmp_path, {}, ("yaml", "jinja2"), image)
    assert not ok
    assert "jinja2: ModuleNotFoundError: No module named 'jinja2'" in report
    assert "1 of 2 imported" in report, "yaml is in the image"
    image.write_text("pyyaml\njinja2\nmarkupsafe\n")
    ok, report = kit_imports_check.check_imports(tmp_path, {}, ("yaml", "jinja2"), image)
    assert ok, report


def test_a_carried_wheel_with_no_local_install_is_unpacked_and_imports(tmp_path: Path) -> None:
    wheel = tmp_path / "kit_only_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("kit_only_pkg/__init__.py", "import yaml\nVALUE = 42\n")
    image = tmp_path / "image.txt"
    image.write_text("pyyaml\n")
    ok, report = kit_imports_check.check_imports(tmp_path, {}, ("kit_only_pkg",), image)
    assert not ok and "No module named 'kit_only_pkg'" in report
    carried = {"kit-only-pkg": wheel}
    ok, report = kit_imports_check.check_imports(tmp_path, carried, ("kit_only_pkg",), image)
    assert ok, report
    image.write_text("")
    ok, report = kit_imports_check.check_imports(tmp_path, carried, ("kit_only_pkg",), image)
    assert not ok and "No module named 'yaml'" in report, "its own needs are checked too"
