"""The package layers (README "Layout") hold: a layer never imports one above it, and core/ stays pure.

Walks every module's imports with the AST (function-level and type-checking imports included), so
an import that breaks the layering fails here before it makes a cycle or drags files into core/.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first. errors.py and durable.py import only the standard library (and xxhash, safetensors' error type) and sit below every layer.
LAYERS = ("errors", "durable", "core", "config", "data", "run", "interop", "eval")
CORE_THIRD_PARTY = {"torch", "numpy", "einops", "xformers", "scipy"}   # xformers: the optional attention kernel;
# scipy: train.ot_pairing's assignment (modules/core/ot_pairing.py)


def layer_of(module: str) -> str:
    """``modules.run.export`` -> ``run``."""
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in a file, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names if base == "modules"]
    return found


def modules_files() -> list[Path]:
    return sorted((ROOT / "modules").rglob("*.py"))


def test_every_module_sits_in_a_layer():
    for path in modules_files():
        parts = path.relative_to(ROOT / "modules").parts
        if parts == ("__init__.py",):
            continue
        assert Path(parts[0]).stem in LAYERS, f"{path}: not in a layer package ({', '.join(LAYERS)})"


def test_no_layer_imports_a_layer_above_it():
    problems = []
    for path in modules_files():
        parts = path.relative_to(ROOT / "modules").parts
        if parts == ("__init__.py",):
            continue
        mine = LAYERS.index(Path(parts[0]).stem)
        for module, line in imports(path):
            if module.startswith("modules.") and LAYERS.index(layer_of(module)) > mine:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not problems, "\n".join(problems)


def test_core_imports_only_torch_numpy_einops_scipy_and_never_opens_a_file():
    stdlib = sys.stdlib_module_names
    problems = []
    for path in sorted((ROOT / "modules" / "core").rglob("*.py")):
        for module, line in imports(path):
            top = module.split(".")[0]
            if top in ("modules", "__future__") or top in stdlib or top in CORE_THIRD_PARTY:
                if top == "modules" and layer_of(module) not in ("core", "errors"):
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
                continue
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} opens a file")
    assert not problems, "\n".join(problems)


def test_the_layer_test_finds_an_import_from_above(tmp_path, monkeypatch):
    """The walk itself: a core module importing run/ is found (so the tests above can fail)."""
    fake = ROOT / "modules" / "core" / "_layer_probe.py"
    monkeypatch.setattr(sys.modules[__name__], "modules_files", lambda: [fake])
    fake.write_text("from modules.run.export import save_network\n")
    try:
        try:
            test_no_layer_imports_a_layer_above_it()
        except AssertionError as e:
            assert "imports modules.run.export" in str(e)
        else:
            raise AssertionError("an import from a higher layer went unnoticed")
    finally:
        fake.unlink()


def project_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (the four entry points and every file under modules/)."""
    files = [*sorted((ROOT / "modules").rglob("*.py")),
             *(ROOT / name for name in ("train_vae.py", "train_unet.py", "sample.py", "evaluate.py", "encode.py"))]

    def name_of(path: Path) -> str:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    names = {name_of(p): p for p in files}
    return {name: {m for m, _ in imports(path) if m in names and m != name} for name, path in names.items()}


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def walk(node: str, seen: tuple[str, ...]) -> list[str]:
        if node in seen:
            raise AssertionError(f"import cycle: {' -> '.join(seen[seen.index(node):] + (node,))}")
        if node not in memo:
            memo[node] = [node] + max((walk(d, seen + (node,)) for d in graph[node]), key=len, default=[])
        return memo[node]
    return max((walk(node, ()) for node in graph), key=len)


def test_imports_have_no_cycle_and_no_chain_longer_than_ten():
    """A reader follows any import chain in at most 10 hops (14, with a cycle, before the four layers), and no two
    modules need each other."""
    chain = longest_chain(project_graph())
    assert len(chain) - 1 <= 10, " -> ".join(chain)
