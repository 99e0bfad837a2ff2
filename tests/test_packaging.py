"""The package list in pyproject.toml covers every package folder, under one import name."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = cfg["package-dir"]
    listed = set(cfg["packages"])
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            # sub-folders of goodserve/ that are themselves mapped elsewhere don't exist
            found.add(dotted)
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    for pkg in listed:
        importlib.import_module(pkg)


def test_no_generic_top_level_modules() -> None:
    import goodserve.schemas

    assert goodserve.schemas.__name__ == "goodserve.schemas"
    assert Path(goodserve.schemas.__file__).parent == ROOT / "schemas"
