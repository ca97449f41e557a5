"""resilience/ stays framework-free: no file in it imports Celery, kombu, boto3, workers or
producers (the import rule of docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import resilience

FORBIDDEN = {"celery", "kombu", "boto3", "botocore", "workers", "producers", "tidegate"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_resilience_module_imports_a_framework():
    package = Path(resilience.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) > 20  # the whole package, subpackages included
    offenders = {str(f.relative_to(package)): sorted(imported_roots(f) & FORBIDDEN)
                 for f in files if imported_roots(f) & FORBIDDEN}
    assert offenders == {}
