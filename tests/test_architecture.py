"""The layering ARCHITECTURE.md promises, read from the source: no import loop between the
package's modules, core/ free of files and terminals, no command importing another command."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deepalign_cli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: package modules it imports (anywhere in the file, lazy imports included)}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_loop_between_package_modules():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import loop: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_core_imports_no_io_terminal_or_command_module():
    graph = _imports()
    for module, deps in graph.items():
        if module.startswith("deepalign_cli.core."):
            bad = {d for d in deps if not d.startswith("deepalign_cli.core") and d != "deepalign_cli.errors"}
            assert not bad, (module, bad)
            source = (PACKAGE / Path(*module.split(".")[1:])).with_suffix(".py").read_text()
            for lib in ("typer", "rich", "mrcfile", "starfile", "pathlib"):
                assert f"import {lib}" not in source and f"from {lib}" not in source, (module, lib)


def test_no_command_imports_another_command():
    from deepalign_cli.main import STAGES

    commands = {f"deepalign_cli.commands.{module}" for _, module, _ in STAGES}
    graph = _imports()
    for module in commands:
        assert not graph[module] & commands, (module, graph[module] & commands)


def test_importing_the_package_changes_nothing_in_the_process():
    """No XLA flags or malloc settings applied by an import: the CLI's entry point does that (jax
    itself, imported first, sets a few variables of its own)."""
    code = ("import os, jax; before = dict(os.environ); import deepalign_cli, deepalign_cli.core.training, deepalign_cli.commands.train; "
            "print(sorted(k for k in os.environ if os.environ.get(k) != before.get(k)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in __import__("os").environ.items() if k not in ("XLA_FLAGS", "MALLOC_ARENA_MAX")})
    assert out.stdout.strip() == "[]", out.stdout
