"""What a process loads by importing some modules: the PC's import budget, shared by the tests
that check it (tests/unit/test_deps.py, and the screen's in test_screen.py)."""

from __future__ import annotations

import json
import subprocess
import sys

# What must never load on a gaming PC: the head's web stack, Ray (a child process there), the
# engine's stack (in its container) and the Docker SDK.
FORBIDDEN = ("fastapi", "pydantic", "pydantic_core", "uvicorn", "starlette", "aiohttp", "ray", "torch", "vllm",
             "docker")


def loaded_after_importing(modules: tuple[str, ...]) -> set[str]:
    """The top-level packages loaded after importing `modules` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in json.loads(out)}
