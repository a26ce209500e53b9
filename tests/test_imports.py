"""The import rules docs/design.md states, checked over the package's source, and prep without torch or DALI."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "alexnet_pipeline"
LEAVES = {"model", "optim", "step", "stats", "config", "classnames", "progress", "augment", "image", "plot",
          "order", "loopback"}
ONLY = {"files": {"config"}, "listing": {"files"}, "workers": {"files"}, "workfiles": {"files", "stats"},
        "units": {"config"}, "storage": {"config"}, "reader": {"order", "shards"},
        "options": {"config", "storage"}, "shards": {"config", "files", "storage", "classnames"}}


def _imports(module: Path) -> tuple[set[str], set[str]]:
    """(package modules, outside top-level packages) that a module imports anywhere in it."""
    ours, outside = set(), set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.module:
                ours.add(node.module.split(".")[0])
            else:
                ours.update(alias.name for alias in node.names if alias.name != "__version__")
        elif isinstance(node, ast.ImportFrom) and node.module:
            outside.add(node.module.split(".")[0])
            if node.module.startswith("alexnet_pipeline"):  # the package by its absolute name
                ours.update([node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            outside.update(alias.name.split(".")[0] for alias in node.names)
            ours.update(a.name.split(".")[1] for a in node.names if a.name.startswith("alexnet_pipeline."))
    outside.discard("alexnet_pipeline")
    return ours, outside


def _name(path: Path) -> str:
    """A module's name as its siblings import it: its stem, or its package's name for a package's __init__."""
    return path.parent.name if path.stem == "__init__" and path.parent != PACKAGE else path.stem


MODULES = {_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
PREP = {_name(p) for p in (PACKAGE / "prep").glob("*.py")}  # the offline tool's modules
TRAINING = {"pipeline", "reader", "cache", "order", "augment", "model", "optim", "step", "build", "train",
            "evaluate", "figures", "checkpoint", "inference", "export", "distributed", "baseline", "bench"}


def test_the_module_rules_of_the_design_hold():
    for name, (ours, outside) in MODULES.items():
        if name in LEAVES:
            assert ours == set(), f"{name}.py imports {ours} from the package; it is a leaf"
        if name in ONLY:
            assert ours <= ONLY[name], f"{name}.py imports {ours - ONLY[name]}"
        if name not in ("cli", "__main__"):
            assert "cli" not in ours, f"{name}.py imports cli: imports go from cli to the commands, never back"
        if "nvidia" in outside:
            assert name == "pipeline", f"{name}.py imports DALI; pipeline.py is the only module that does"
        if name in PREP:
            assert not ours & TRAINING, f"prep/{name}.py imports {ours & TRAINING}: prep needs nothing of training's"
            assert not {"torch", "nvidia"} & outside, f"prep/{name}.py imports torch or DALI"
    assert "nvidia" in MODULES["pipeline"][1]
    assert len(PREP) == 9 and TRAINING <= set(MODULES), "the rule's lists name modules that exist"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph` (module -> the package modules it imports, at any depth of its code), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [name, dep] if dep in path else [name, dep]
            if dep not in state and (found := visit(dep, path + [name])):
                return found
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [])):
            return found
    return None


def test_the_package_has_no_import_circle():
    """Imports inside functions count: a circle hidden in one still ties two modules together."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself finds one
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = {name: {m for m in ours if m in MODULES and m != name} for name, (ours, _) in MODULES.items()}
    found = _cycle(graph)
    assert found is None, "import circle: " + " -> ".join(found or [])


def test_options_writes_out_the_models_the_steps_and_the_augmentations_choices():
    from alexnet_pipeline import augment, model, options, step

    assert options.INITS == model.INITS and options.PRECISIONS == step.PRECISIONS
    assert options.MEAN_MODES == augment.MEAN_MODES and options.LIGHTING_FORMS == augment.LIGHTING_FORMS


BLOCK = """
import sys, time
t0 = time.perf_counter()
class Block:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "nvidia"):
            raise ImportError(f"{name} is blocked here")
sys.meta_path.insert(0, Block())
from alexnet_pipeline.cli import prep_main
code = prep_main(sys.argv[1:])
print(f"started in {time.perf_counter() - t0:.3f}", file=sys.stderr)
sys.exit(code)
"""


def test_prep_runs_with_torch_and_dali_blocked(sample, tmp_path):
    def prep(*args):
        return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, cwd=ROOT)

    assert "usage: alexnet-prep" in prep("--help").stdout
    version = prep("--version")
    assert version.returncode == 0 and "nvidia-dali" in version.stdout, version.stderr
    r = prep("--imagenet-root", str(sample[0] / "extracted"), "--out", str(tmp_path / "o"), "--workers", "2",
             "--splits", "val")
    assert r.returncode == 0 and "wrote 12 val samples" in r.stdout, r.stderr[-2000:]
    ok = prep("--verify", str(tmp_path / "o"))
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr[-2000:]


def test_prep_modules_import_neither_torch_nor_dali():
    """What a small prep paid for most of its time when torch came with its options (1.2 s of a 1.3 s start)."""
    r = subprocess.run([sys.executable, "-c", "import sys; from alexnet_pipeline import cli, prep, shards, verified; "
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nvidia')))"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
