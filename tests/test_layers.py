"""The package's layers point down only (read from the source with ``ast``, not from a list kept by hand).

* no module imports a private name (``_x``) of another;
* library modules do not import the command line (``bpfl.cli``, ``bpfl.demo``) or the notebook layer
  (``bpfl.notebook``): those sit on top;
* the model knows no prompt-design variants (``bpfl.prompt_designs`` builds on ``bpfl.model``);
* imports of ``bpfl`` modules sit at the top of a module, never inside a function (a function-level import
  that hides a cycle hides a layering mistake).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bpfl"
#: the layers on top: who may import them
TOP = {"bpfl.cli": {"bpfl.__main__"}, "bpfl.demo": {"bpfl.cli"},
       "bpfl.notebook": {"bpfl.cli", "bpfl.notebook"}}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports():
    """(module, imported module, names, inside a function?, line) for every import of a bpfl module."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, path.name == "__init__.py")
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                target, names = node.names[0].name, []
            else:
                continue
            if target == "bpfl" or target.startswith("bpfl."):
                out.append((module, target, names, id(node) in in_function, f"{path.name}:{node.lineno}"))
    return out


IMPORTS = _imports()


def test_the_import_reader_sees_the_package():
    targets = {(m, t) for m, t, *_ in IMPORTS}
    assert ("bpfl.model", "bpfl.flow") in targets and ("bpfl.cli", "bpfl.demo") in targets
    assert len(IMPORTS) > 100


def test_no_module_imports_a_private_name_of_another():
    bad = [(where, t, n) for m, t, names, _, where in IMPORTS for n in names
           if n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, f"private names imported across modules: {bad}"


def test_lower_layers_do_not_import_the_cli_or_the_notebooks():
    bad = []
    for module, target, names, _, where in IMPORTS:
        for top, allowed in TOP.items():
            hits = target == top or target.startswith(top + ".") or (
                target == "bpfl" and top.split(".")[1] in names)
            if hits and not any(module == a or module.startswith(a + ".") for a in allowed | {top}):
                bad.append((where, module, "->", top))
    assert not bad, f"imports that point up a layer: {bad}"


def test_the_model_knows_no_prompt_designs():
    assert not [w for m, t, *_, w in IMPORTS if m == "bpfl.model" and t == "bpfl.prompt_designs"]
    assert "prompt_designs" not in (PACKAGE / "model.py").read_text().replace("bpfl.prompt_designs", "")


def test_no_function_level_imports_of_bpfl_modules():
    bad = [(where, target) for _, target, _, inside, where in IMPORTS if inside]
    assert not bad, f"imports of bpfl modules inside functions (move them to the top; fix the layering): {bad}"
