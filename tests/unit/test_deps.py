"""The agent's dependency budget as a test (as tailscaled's deps_test.go does): what runs on a
gaming PC must not load the head's web stack or Ray into the agent's memory (its RSS goal is
60 MB). Ray runs as a child process; FastAPI, pydantic and uvicorn are the head's."""

import subprocess
import sys

from testing.imports import FORBIDDEN, loaded_after_importing

AGENT_MODULES = (
    "garage_node.cli", "garage_node.cli.node", "garage_node.node.agent", "garage_node.node.localapi",
    "garage_node.node.status", "garage_node.node.headclient", "garage_node.node.engine.manager",
    "garage_node.placement.fit", "garage_node.node.raystart",
)


def test_agent_imports_no_web_stack_and_no_ray():
    loaded = loaded_after_importing(AGENT_MODULES)
    assert not loaded & set(FORBIDDEN), f"the agent loads {sorted(loaded & set(FORBIDDEN))}"


def test_the_check_would_notice():
    # The head does load them: the same check must see that, or it proves nothing.
    assert {"fastapi", "pydantic"} <= loaded_after_importing(("garage_node.head.api",))


def test_wheel_ships_no_test_harness(tmp_path):
    """What goes onto a USB stick: the package and its model catalog, not testing/ or tests/."""
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(repo)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("garage_node-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "garage_node" in top and all(t == "garage_node" or t.endswith(".dist-info") for t in top), top
    assert "garage_node/placement/models.toml" in names
    assert not [n for n in names if n.endswith(".c") or "/testing/" in n or n.startswith(("testing/", "tests/"))]


def _imports_of(package: str) -> dict[str, set[str]]:
    """Each module file under garage_node/<package> -> the garage_node modules it imports,
    read from its source, so an import inside a function (run only on some path) counts too."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out: dict[str, set[str]] = {}
    for path in sorted((root / "garage_node" / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: resolved against the module's own package
                    package_ = list(parts[:-1])
                    module = ".".join(package_[:len(package_) - node.level + 1] + ([module] if module else []))
                # `from garage_node import node` names a package, not a thing in a module
                names.update([module] + [f"{module}.{a.name}" for a in node.names])
        out[str(path.relative_to(root))] = {n for n in names if n.startswith("garage_node")}
    return out


def _importers(package: str, forbidden: str) -> list[str]:
    return sorted(f"{f} imports {m}" for f, mods in _imports_of(package).items() for m in mods
                  if m == f"garage_node.{forbidden}" or m.startswith(f"garage_node.{forbidden}."))


def test_head_and_node_do_not_import_each_other():
    """What both sides need (overlay facts, settings, wire messages) lives in garage_node.core:
    the head must not depend on the agent's package, nor the agent on the head's."""
    assert _importers("head", "node") == []
    assert _importers("node", "head") == []
    assert _importers("core", "node") == [] and _importers("core", "head") == []
    # Placement (fit arithmetic, catalog, the head's decision) is shared by both sides.
    assert _importers("placement", "node") == [] and _importers("placement", "head") == []


def test_the_import_check_would_notice():
    # Every part of the head imports from core: a reader that saw no imports would prove nothing.
    assert _importers("head", "core")
