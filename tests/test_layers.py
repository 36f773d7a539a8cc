"""The import order of python/flashlm, declared once (TIERS) and checked on every module's source.

A module may import flashlm modules of its own unit (a package, with the top-level modules that re-export it)
and of units in lower tiers only; two units of one tier must not import each other; only flashlm.ops imports
flashlm._C. Every `import` and `from ... import` counts, wherever it sits (function-level imports too), and
so does a string naming a flashlm module in a module that imports by name (importlib.import_module). A module
that is in no unit fails the test, so a new package has to be placed here first.
"""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "python"

# Lowest first; each tier a list of units, each unit the names (packages or lone modules) it is made of, its
# own name first. Units not written yet are listed so that they land in their place.
TIERS = [
    [("flashlm.ops", "flashlm", "flashlm.flash_attn_interface")],  # kernels; the root and the flash-attn drop-in
    [("flashlm.dist",)],                                            # collectives
    [("flashlm.models",)],                                          # the Transformer
    [("flashlm.quant",), ("flashlm.parallel",)],                    # quantized layers; model parallelism
    [("flashlm.io", "flashlm.gguf")],                               # file formats, tokenizers, loaders, converters
    [("flashlm.runtime",)],                                         # engine, scheduler, block manager, runner
    [("flashlm.train",), ("flashlm.eval",)],                        # trainer, checkpoints, export; evaluation
    [("flashlm.serve",)],                                           # HTTP server
    [("flashlm.cli", "flashlm.__main__", "flashlm.demo")],          # commands
]
UNIT = {name: unit[0] for tier in TIERS for unit in tier for name in unit}
TIER = {unit[0]: i + 1 for i, tier in enumerate(TIERS) for unit in tier}
NATIVE = "flashlm._C"  # the compiled module: flashlm.ops alone imports it
NATIVE_IMPORTER = "flashlm.ops"

# The one exception: the package root's front door (`flashlm.LLM`, `flashlm.SamplingParams`) is resolved on
# first attribute access (PEP 562), never by `import flashlm`, so no lower layer loads the runtime through it.
ALLOWED = {("flashlm", "flashlm.runtime.engine"), ("flashlm", "flashlm.runtime.sampling_params")}


def unit_of(module: str):
    """The unit a module belongs to, by the longest of its names that is the module or a package above it
    (the name `flashlm` covers only the root's __init__); None when it is in none."""
    if module == "flashlm":
        return UNIT["flashlm"]
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        name = ".".join(parts[:n])
        if name in UNIT:
            return UNIT[name]
    return None


def source_modules(root: Path = SOURCE) -> dict:
    """Module name -> (path, is_package) for every .py file under root/flashlm."""
    found = {}
    for path in sorted((root / "flashlm").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def imports_of(module: str, is_package: bool, tree: ast.AST, known) -> list:
    """(line, text, target module) of every flashlm import in the tree. `known` holds the module names
    that exist, to tell `from package import submodule` from `from module import name`."""
    found = []
    by_name = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, f"import {alias.name}", alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one package up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                up = package[:len(package) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, text, sub if sub in known or sub == NATIVE else base))
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            by_name = True
        elif isinstance(node, ast.Name) and node.id in ("import_module", "__import__"):
            by_name = True
    if by_name:  # strings naming modules are what it imports; docstrings (bare string statements) are not
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and node.value in known):
                found.append((node.lineno, f"import_module({node.value!r})", node.value))
    return [f for f in found if f[2] == "flashlm" or f[2].startswith("flashlm.")]


def violations(module: str, path, is_package: bool, source: str, known) -> list:
    """What is wrong with the module's imports, one message each (empty when it keeps the order)."""
    unit = unit_of(module)
    if unit is None:
        return [f"{path}: {module} is in no tier: place its package in TIERS (tests/test_layers.py)"]
    tier = TIER[unit]
    problems = []
    for line, text, target in imports_of(module, is_package, ast.parse(source, str(path)), known):
        where = f"{path}:{line}: {module} (tier {tier}, {unit}) `{text}`"
        if target == NATIVE or target.startswith(NATIVE + "."):
            if module != NATIVE_IMPORTER and not module.startswith(NATIVE_IMPORTER + "."):
                problems.append(f"{where}: only {NATIVE_IMPORTER} may import {NATIVE}")
            continue
        if target not in known:
            problems.append(f"{where}: {target} is no module under python/flashlm")
            continue
        other = unit_of(target)
        if other is None or other == unit or (module, target) in ALLOWED:
            continue  # a module in no tier fails on its own
        if TIER[other] >= tier:
            how = "the same tier" if TIER[other] == tier else "a higher tier"
            problems.append(f"{where}: imports {target} (tier {TIER[other]}, {other}), {how}")
    return problems


MODULES = source_modules()


def test_the_source_tree_is_found():
    # A wrong SOURCE would leave nothing to check and every test below passing.
    assert {"flashlm", "flashlm.ops", "flashlm.runtime.engine", "flashlm.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_keep_the_order(module):
    path, is_package = MODULES[module]
    problems = violations(module, path, is_package, path.read_text(), set(MODULES))
    assert not problems, "\n".join(problems)


# ---- the checker itself, on made-up modules ------------------------------------------------------------------

KNOWN = set(MODULES) | {"flashlm.parallel", "flashlm.parallel.tp"}


def is_package(module: str) -> bool:
    return module in MODULES and MODULES[module][1]


@pytest.mark.parametrize("module, source, wanted", [
    ("flashlm.models.transformer", "def f():\n    from flashlm.runtime import engine\n",
     "imports flashlm.runtime.engine (tier 6, flashlm.runtime), a higher tier"),
    ("flashlm.models.transformer", "import flashlm.runtime.engine\n", "a higher tier"),
    ("flashlm.models.transformer", "from ..runtime.sampler import Sampler\n", "flashlm.runtime.sampler"),
    ("flashlm.models", "from .. import cli\n", "imports flashlm.cli (tier 9"),
    ("flashlm.quant.linear", "import flashlm.parallel.tp\n", "the same tier"),
    ("flashlm.io.gguf", "from flashlm._C import gguf\n", "only flashlm.ops may import flashlm._C"),
    ("flashlm", "from flashlm import _C\n", "only flashlm.ops may import flashlm._C"),
    ("flashlm.runtime.engine", "import importlib\nM = 'flashlm.train.trainer'\nimportlib.import_module(M)\n",
     "import_module('flashlm.train.trainer')"),
    ("flashlm.runtime.engine", "from flashlm.nothing import x\n", "no module under python/flashlm"),
    ("flashlm.widgets.knob", "x = 1\n", "in no tier"),
])
def test_the_checker_reports_violations(module, source, wanted):
    problems = violations(module, "made-up.py", is_package(module), source, KNOWN)
    assert len(problems) == 1 and wanted in problems[0], problems


@pytest.mark.parametrize("module, source", [
    ("flashlm.runtime.engine", "from flashlm.models.transformer import Transformer\nimport flashlm.io\n"),
    ("flashlm.runtime.engine", "from . import sampler\nfrom .sampler import Sampler\n"),
    ("flashlm.ops.attention", "from flashlm import _C\nfrom flashlm._C import attention\n"),
    ("flashlm.quant.linear", "from flashlm import ops\nfrom flashlm.ops import int8_linear\n"),
    ("flashlm.cli", "def main():\n    from flashlm.train.trainer import run_training\n"),
    ("flashlm", "import importlib\n_LAZY = {'LLM': 'flashlm.runtime.engine'}\nimportlib.import_module(_LAZY['LLM'])\n"),
])
def test_the_checker_accepts_the_order(module, source):
    assert violations(module, "made-up.py", is_package(module), source, KNOWN) == []
