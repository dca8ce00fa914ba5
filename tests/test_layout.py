"""The package's data flow, held by its imports: each stage imports only the stages below it
(formats <- hashtags <- data <- train), read from the source, not from what happens to be imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastpretrain"
# stage -> the fastpretrain modules it must not import (anything at its level or below is fine)
FORBIDDEN = {
    "formats": ("hashtags", "data", "train", "models", "loss", "evaluate", "demo", "cli", "transfer"),
    "hashtags": ("data", "train", "models", "loss", "evaluate", "demo", "cli", "transfer"),
    "data": ("train", "models", "loss", "evaluate", "demo", "cli", "transfer"),
    "train": ("cli", "transfer"),
}


def fastpretrain_imports(path: Path) -> set[str]:
    """The first component under ``fastpretrain.`` of every module ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fastpretrain" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_stages_import_only_downwards(stage):
    wrong = {str(path.relative_to(PACKAGE)): sorted(fastpretrain_imports(path) & set(FORBIDDEN[stage]))
             for path in sorted((PACKAGE / stage).rglob("*.py"))}
    assert {path: names for path, names in wrong.items() if names} == {}
