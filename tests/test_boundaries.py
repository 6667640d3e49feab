"""Dependencies point one way, jobs -> pipeline -> registry -> knnssd, and the core stays light.

Read from the source (every import statement, top-level or inside a function), so a lazy import cannot hide a
wrong-way dependency; and checked at run time, so the light core really imports no Ray, Optuna or MLflow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

# The core's one seam to the registry (see its docstring).
CORE_REGISTRY_SEAM = "knnssd/bundle/sources.py"


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT).stdout
    return set(out.split())


def top_level_imports(path: Path) -> set[str]:
    """The first component of every module `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def package_imports(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(REPO_ROOT)): top_level_imports(path)
            for path in sorted((REPO_ROOT / package).rglob("*.py"))}


def test_core_imports_no_pipeline_or_jobs_and_registry_only_at_its_seam():
    for module, imports in package_imports("knnssd").items():
        assert not imports & {"pipeline", "jobs"}, module
        assert not imports & {"ray", "optuna", "mlflow"}, module
        if module != CORE_REGISTRY_SEAM:
            assert "registry" not in imports, f"{module} imports registry; go through {CORE_REGISTRY_SEAM}"
    assert "registry" in top_level_imports(REPO_ROOT / CORE_REGISTRY_SEAM)  # the seam is where it says


def test_registry_imports_no_pipeline_or_jobs():
    for module, imports in package_imports("registry").items():
        assert not imports & {"pipeline", "jobs"}, module
        assert not imports & {"ray", "optuna"}, module


def test_pipeline_imports_no_jobs():
    for module, imports in package_imports("pipeline").items():
        assert "jobs" not in imports, module


MAX_MODULE_LINES = 300  # the project's rule for pipeline/ (and new modules)


def test_no_pipeline_module_is_over_the_line_limit():
    long = {str(path.relative_to(REPO_ROOT)): len(path.read_text().splitlines())
            for path in sorted((REPO_ROOT / "pipeline").glob("*.py"))}
    assert not {path: lines for path, lines in long.items() if lines > MAX_MODULE_LINES}


def module_imports(path: Path, package: str) -> set[str]:
    """The modules of `package` that `path` imports (`package.x`, or `x` from `from package import x`),
    wherever the import statement stands, under TYPE_CHECKING too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(f"{package}."))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == package:
                found.update(f"{package}.{alias.name}" for alias in node.names)
            elif node.module.startswith(f"{package}."):
                found.add(node.module)
    return {name for name in found if (REPO_ROOT / (name.replace(".", "/") + ".py")).is_file()}


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (module -> modules it imports) as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [node, target] if target in path else [node, target]
            if target not in state:
                found = visit(target, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def test_pipeline_modules_import_each_other_without_a_cycle():
    graph = {f"pipeline.{path.stem}": module_imports(path, "pipeline")
             for path in sorted((REPO_ROOT / "pipeline").glob("*.py"))}
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_core_imports_no_ray_optuna_mlflow_at_run_time():
    modules = imported_after("import knnssd, knnssd.cli.commands, knnssd.bundle.runtime, knnssd.cli.generate, "
                             "knnssd.bundle")
    assert not modules & {"ray", "optuna", "mlflow", "registry", "pipeline"}


def test_registry_does_not_import_the_decoding_loop():
    modules = imported_after("import registry.mlflow_store, sys; assert 'knnssd.engine.decoding' not in sys.modules")
    assert not modules & {"ray", "optuna", "torch"}


def test_evaluation_report_needs_no_torch():
    """`jobs/evaluate.py --rerender` re-reports a run from its CSV alone."""
    modules = imported_after("import jobs.evaluate, pipeline.report")
    assert "torch" not in modules


def test_only_the_server_imports_its_web_stack():
    """FastAPI, uvicorn and prometheus-client (the `serve` extra) stay inside knnssd/serve/ (and `knnssd serve`'s
    command, knnssd/cli/serve.py, which starts uvicorn inside its function), and `knnssd` without `serve` loads
    none of them: importing the command line, that command included, imports no web package."""
    web = {"fastapi", "uvicorn", "prometheus_client", "starlette"}
    for module, imports in package_imports("knnssd").items():
        if not module.startswith("knnssd/serve/"):
            assert not imports & (web - {"uvicorn"} if module == "knnssd/cli/serve.py" else web), module
    assert not imported_after("import knnssd.cli.commands, knnssd.cli.serve") & web


def test_the_server_imports_no_ray_or_mlflow_until_it_follows_a_registry():
    modules = imported_after("import knnssd.serve.app, knnssd.cli.serve")
    assert not modules & {"ray", "optuna", "mlflow", "registry", "pipeline"}


# knnssd's packages, lowest first: each imports only from those below it (and from the top-level foundation
# modules errors.py, cachedir.py, demo_prompts.py, which import no package of knnssd).
CORE_LAYERS = ("engine", "bundle", "serve", "cli")


def core_layer(module: str) -> int | None:
    """The layer of a `knnssd.x...` module name or a `knnssd/x/...` path; None for a top-level module."""
    parts = module.replace("/", ".").removesuffix(".py").split(".")
    return CORE_LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in CORE_LAYERS else None


def knnssd_targets(path: Path) -> set[str]:
    """Every `knnssd...` module or package `path` imports, wherever the statement stands; for
    `from knnssd.x import y`, both knnssd.x and knnssd.x.y (y may be a module or a name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("knnssd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("knnssd") and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def wrong_way_imports() -> list[str]:
    found = []
    for path in sorted((REPO_ROOT / "knnssd").rglob("*.py")):
        module = str(path.relative_to(REPO_ROOT))
        own = core_layer(module)
        for target in sorted(knnssd_targets(path)):
            layer = core_layer(target)
            if layer is not None and (own is None or layer > own):
                found.append(f"{module} imports {target}")
    return found


def test_knnssd_packages_import_one_way():
    """cli over serve over bundle over engine: the engine knows no bundle, a bundle no server or command line."""
    assert not wrong_way_imports()
    assert core_layer("knnssd/engine/decoding.py") == 0 and core_layer("knnssd.cli.commands") == 3
    assert core_layer("knnssd/errors.py") is None


def test_the_layer_check_sees_package_imports():
    """The check above reads `from knnssd.engine.drafters import X` and `from knnssd.bundle import reading`."""
    imports = knnssd_targets(REPO_ROOT / "knnssd" / "bundle" / "runtime.py")
    assert "knnssd.engine.decoding" in imports and "knnssd.bundle.signing" in imports
