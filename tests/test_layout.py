"""The architecture, kept by tests: the core stays torch-only, and dvc.yaml's deps match the code.

Imports are read from the source (every `import` statement, also those inside functions), so
a new import is caught the moment it is written, whether or not a test runs through it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .helpers import ROOT

PACKAGE = "stages"
CORE = "stages.core"
# What the core may import besides the standard library and itself: torch, torchvision and
# safetensors (all on a bare GPU machine) and the project's params, errors, file helpers and the
# model file's metadata checks (torch-free, so that analyze reaches them without torch).
CORE_MAY_IMPORT = {"torch", "torchvision", "safetensors", "stages", "stages.params", "stages.errors", "stages.io",
                   "stages.model_file"}
SHELL_LIBRARIES = ("dvc", "dvclive", "typer", "matplotlib", "sklearn", "pydantic")


# --- reading imports from the source ---------------------------------------------------------


def module_path(name: str) -> Path | None:
    """The file of a project module (`stages.core.loop` -> stages/core/loop.py), or None."""
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(node: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything the import statements below `node` import."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            names.update(alias.name for alias in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join(anchor + ([n.module] if n.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in n.names)  # `from pkg import submodule`
    return names


def project_imports(names: set[str]) -> set[str]:
    """The project modules among `names`, with every package above them (importing a.b runs a/__init__)."""
    found = set()
    for name in names:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_path(".".join(parts[:i])))
    return found


def top_level(tree: ast.Module) -> ast.Module:
    return ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])


def imports_of(module: str) -> set[str]:
    path = module_path(module)
    tree = ast.parse(path.read_text())
    if module == PACKAGE:
        # The package root's functions (`stages.load_model`) are the public API for users; the
        # stages call the core directly (test_stages_do_not_call_the_public_api checks it).
        tree = top_level(tree)
    return imported_names(tree, module, path.name == "__init__.py")


def closure(start: set[str], expanded: set[str] = frozenset()) -> set[str]:
    """Every project module that importing `start` may run, lazy imports included; the modules in
    `expanded` are counted but not followed (their imports are already in `start`)."""
    seen: set[str] = set(expanded)
    todo = project_imports(start)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= project_imports(imports_of(module)) - seen
    return seen


def command_function(name: str) -> ast.FunctionDef:
    """The function in cli.py behind `python -m stages <name>`."""
    tree = ast.parse((ROOT / "stages" / "cli.py").read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for deco in fn.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "command":
                declared = deco.args[0].value if deco.args else fn.name.replace("_", "-")
                if declared == name:
                    return fn
    raise AssertionError(f"cli.py has no command {name!r}")


def command_modules(command: str) -> set[str]:
    """What `python -m stages <command>` imports: __main__, cli's top level, the command's own imports."""
    cli = ast.parse((ROOT / "stages" / "cli.py").read_text())
    start = {"stages.__main__"}
    start |= imported_names(top_level(cli), "stages.cli", False)
    start |= imported_names(command_function(command), "stages.cli", False)
    return closure(start, expanded={"stages.cli"})


# --- the stages of dvc.yaml ------------------------------------------------------------------


def stages_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_command(cmd: str) -> str:
    words = cmd.split()
    assert words[:3] == ["python", "-m", "stages"], f"not a stages command: {cmd}"
    return words[3]


def covered_modules(deps: list[str]) -> set[str]:
    """The project modules whose files dvc.yaml's deps cover (a folder dep covers what is under it)."""
    found = set()
    for dep in deps:
        path = ROOT / dep
        if path.is_file() and path.suffix == ".py":
            found.add(module_name(path))
        elif path.is_dir() and (path / "__init__.py").is_file():
            found.update(module_name(p) for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    return found


@pytest.mark.parametrize("stage", list(stages_yaml()))
def test_every_imported_module_is_a_dep_and_no_other(stage):
    spec = stages_yaml()[stage]
    imported = command_modules(stage_command(spec["cmd"]))
    listed = covered_modules(spec["deps"])
    missing = sorted(imported - listed)
    assert not missing, (f"dvc.yaml: stage '{stage}' runs {', '.join(m.replace('.', '/') + '.py' for m in missing)} "
                         f"but does not list it in its deps; add it, or DVC will not rerun '{stage}' when it changes")
    extra = sorted(listed - imported)
    assert not extra, (f"dvc.yaml: stage '{stage}' lists {', '.join(m.replace('.', '/') + '.py' for m in extra)} "
                       f"in its deps but never imports it; remove it, or an edit there reruns '{stage}' for nothing")


def test_the_dependency_reader_sees_lazy_and_relative_imports():
    # evaluate imports sklearn and the core inside functions and relatively; train reaches the
    # checkpoint module only through its own imports; check-params plans devices and builds models as train
    # does, but never loads data or trains.
    assert "stages.core.checkpoint" in command_modules("train")
    assert "stages.core.checkpoint" not in command_modules("evaluate")
    assert {"stages.core.weights", "stages.core.models", "stages.core"} <= command_modules("evaluate")
    assert {"stages.core.devices", "stages.core.models"} <= command_modules("check-params")
    assert "stages.core.loop" not in command_modules("check-params")
    assert {"stages.probe", "stages.core.loop", "stages.core.launch"} <= command_modules("probe")


def test_analyze_only_reads_files():
    """The report is files in, Markdown out: analyze imports no module that trains, launches or times
    (the probe stage does), so a change to the report's wording reruns analyze alone; and nothing of the
    core, which would import torch (tests/test_analyze.py runs it where torch cannot be imported)."""
    analyze = command_modules("analyze")
    assert "stages.probe" not in analyze
    assert not analyze & set(core_modules())


def test_stages_do_not_call_the_public_api():
    public = {f"{PACKAGE}.{name}" for name in ("load_model",)}
    for path in sorted((ROOT / "stages").rglob("*.py")):
        module = module_name(path)
        used = imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py") & public
        assert not used, f"{module} imports {used}; import it from stages.core (the deps test reads the root shallowly)"


def test_pycache_is_out_of_dvcs_view():
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


# --- the core's boundary ---------------------------------------------------------------------


def core_modules() -> list[str]:
    return sorted(module_name(p) for p in (ROOT / "stages" / "core").rglob("*.py"))


def outside_imports(module: str) -> set[str]:
    """What a module imports that is neither the standard library nor the core itself."""
    names = set()
    for name in imports_of(module):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or name.startswith(CORE) or name == "__future__":
            continue
        names.add(name if top == PACKAGE else top)
    return names


@pytest.mark.parametrize("module", core_modules())
def test_core_imports_only_torch_and_the_allowed_project_modules(module):
    bad = outside_imports(module) - CORE_MAY_IMPORT
    # `from ..params import X` reads as stages.params.X: the module is what counts.
    bad = {name for name in bad if name.rpartition(".")[0] not in CORE_MAY_IMPORT - {"stages"}}
    assert not bad, f"{module} imports {sorted(bad)}; the core may import only {sorted(CORE_MAY_IMPORT)}"


def test_benchmarks_import_the_core_only():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for name in imported_names(tree, "benchmarks." + path.stem, False):
            if name.startswith(PACKAGE + ".") or name == PACKAGE:
                ok = (name.startswith(CORE) or name in CORE_MAY_IMPORT
                      or name.rpartition(".")[0] in CORE_MAY_IMPORT - {"stages"})
                assert ok, f"{path.name} imports {name}; benchmarks use the training core only"
            assert name.split(".")[0] not in SHELL_LIBRARIES, f"{path.name} imports {name}"


def test_core_trains_and_saves_with_the_shell_libraries_unimportable(tmp_path):
    """A real run of the core in a Python where dvc, dvclive, typer, matplotlib, scikit-learn and
    pydantic cannot be imported at all: two training steps, then save and load the model."""
    code = f"""
import sys
for name in {SHELL_LIBRARIES!r}:
    sys.modules[name] = None  # as if not installed: find_spec gives None, import raises ImportError
import importlib, pkgutil, torch
import stages.core
for m in pkgutil.walk_packages(stages.core.__path__, 'stages.core.'):
    importlib.import_module(m.name)
from stages.core.batches import place_split
from stages.core.devices import plan_devices
from stages.core.distributed import DistContext
from stages.core.loop import build_loop_state, prepare_model, train_one_epoch, unwrap
from stages.core.models import build_model
from stages.core.weights import load_model, save_model
from stages.model_file import model_metadata
from stages.params import TrainParams
info = dict(dataset='digits', shape=[1, 8, 8], num_classes=3, class_names=['a', 'b', 'c'], mean=[0.5], std=[0.25],
            image_mode='L', resize='stretch')
cfg = TrainParams(epochs=1, batch_size=8, accelerator='cpu')
plan, ctx, dev = plan_devices('cpu', 1, 'dp'), DistContext(), torch.device('cpu')
model = prepare_model(build_model('small-cnn', 1, 8, 3), cfg, plan, ctx, dev)
st = build_loop_state(model, cfg, ctx, dev, info, 16)
images, labels = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 3
stats = train_one_epoch(model, place_split(images, labels, dev), 1, st)
assert stats.samples == 16 and st.step == 2, stats
save_model({str(tmp_path / 'm.safetensors')!r}, unwrap(model), model_metadata('small-cnn', info))
loaded = load_model({str(tmp_path / 'm.safetensors')!r})
assert loaded.stages_metadata['class_names'] == ['a', 'b', 'c']
leaked = sorted(m for m, mod in sys.modules.items() if m.split('.')[0] in {SHELL_LIBRARIES!r} and mod is not None)
assert not leaked, leaked
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
