"""Imports point down the layer list of STYLE.md; a module reaching up is a design error."""

import ast
import os

import protlm

LAYERS = {
    "errors": 1, "utils": 1, "config": 1, "stages": 1, "settings": 1, "precision": 1,
    "tokenizer": 2, "model": 2,
    "data": 3, "objectives": 3, "distributed": 3,
    "train": 4, "convert": 4, "embedding": 4, "evaluate": 4, "generation": 4, "finetune": 4,
    "analysis": 5, "ablate": 5,
    "demo": 6, "cli": 6,
}
ROOT = os.path.dirname(protlm.__file__)


def _module_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("protlm."):
            yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("protlm."):
                    yield alias.name.split(".")[1], node.lineno


def test_imports_point_down():
    problems = []
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            top = rel.split(os.sep)[0].removesuffix(".py")
            if top not in LAYERS:
                continue
            for target, line in _module_imports(path):
                if target in LAYERS and LAYERS[target] > LAYERS[top]:
                    problems.append(f"{rel}:{line} imports protlm.{target} (layer {LAYERS[target]} > {LAYERS[top]})")
    assert not problems, "\n".join(problems)


def test_library_code_imports_submodules_not_the_package():
    # protlm/__init__.py is the users' facade over every layer; library code going through it hides which layer it
    # reaches (protlm.load is convert, layer 4). The version string is the one name that belongs to no layer.
    problems = []
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py") or (dirpath == ROOT and name == "__init__.py"):
                continue
            path = os.path.join(dirpath, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Import) and any(a.name == "protlm" for a in node.names):
                    what = "import protlm"
                elif (isinstance(node, ast.ImportFrom) and node.module == "protlm" and node.level == 0
                      and any(a.name != "__version__" for a in node.names)):
                    what = f"from protlm import {', '.join(a.name for a in node.names)}"
                else:
                    continue
                problems.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {what} (import the submodule)")
    assert not problems, "\n".join(problems)


def test_model_does_not_import_transformers():
    src = open(os.path.join(ROOT, "model", "t5.py"), encoding="utf-8").read()
    assert "transformers" not in {n.split(".")[0] for n in _all_imports(src)}


def _all_imports(src):
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
