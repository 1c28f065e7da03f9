"""The package's layers: the light core, the wings, the entry points; imports only go down (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "spafit_jax"
#: bottom to top; a wing may import the core and the wings before it in its own row's list (architecture.md)
MAY_IMPORT = {
    "data": set(),
    "models": set(),
    "config": {"data"},
    "training": {"config", "data", "models"},
    "tpu": {"training", "config", "data", "models"},
    "after_training": {"training", "config", "data", "models"},
    "experiments": {"after_training", "training", "config", "data", "models"},
}
CORE = {"errors", "methods", "tree_paths", "stratified", "masking", "lora"}


def _imports(path: Path) -> set[str]:
    """The spafit_jax names (first component below spafit_jax) `path` imports, at any depth."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            if n.module == "spafit_jax":
                out |= {a.name for a in n.names}
            elif n.module.startswith("spafit_jax."):
                out.add(n.module.split(".")[1])
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("spafit_jax.")}
    return out


def test_every_wing_says_what_it_owns_and_may_import():
    wings = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
    assert set(wings) == set(MAY_IMPORT), "a wing was added or removed: update MAY_IMPORT and docs/architecture.md"
    for wing in wings:
        doc = ast.get_docstring(ast.parse((PKG / wing / "__init__.py").read_text())) or ""
        assert "Owns:" in doc and "May import:" in doc, wing
        owned = {p.stem for p in (PKG / wing).glob("*.py")} - {"__init__"}
        listed = set(doc.split("Owns:", 1)[1].split("\n\n")[0].replace(",", " ").replace(".", " ").split())
        assert owned <= listed, f"{wing}/__init__.py does not name {sorted(owned - listed)}"


@pytest.mark.parametrize("wing", sorted(MAY_IMPORT))
def test_a_wing_imports_only_the_core_and_the_wings_below_it(wing):
    allowed = CORE | MAY_IMPORT[wing] | {wing, "launch"}  # launch: the [train] extra check, no imports of its own
    for path in sorted((PKG / wing).glob("*.py")):
        wrong = _imports(path) - allowed
        assert not wrong, f"spafit_jax/{wing}/{path.name} imports {sorted(wrong)}, which {wing} may not import"


def test_the_light_core_imports_no_wing():
    for name in sorted(CORE):
        wrong = _imports(PKG / f"{name}.py") - CORE
        assert not wrong, f"spafit_jax/{name}.py imports {sorted(wrong)}: the light install has only the core"
