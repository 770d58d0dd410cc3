"""The package layout's promise: imports point one way, cli -> commands -> strategies ->
regress | reports -> search | mechanism -> model -> files -> errors, so strategies depend on the
core and never the reverse, and the parts on one level do not import each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A module may import modules of its own part or of a lower rank.
RANK = {"errors": 0, "files": 1, "model": 2, "search": 3, "mechanism": 3, "regress": 4, "reports": 4,
        "strategies": 5, "commands": 6, "cli": 7}  # fmt: skip


def part(module: str) -> str | None:
    """The layout part a dotted module name belongs to (None: outside the project, or the package root)."""
    names = module.split(".")
    if names[0] == "strategies":
        return "strategies"
    return names[1] if names[0] == "advsearch" and len(names) > 1 else None


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a project module in `path`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if part(m) is not None]


def modules() -> list[Path]:
    return sorted((ROOT / "advsearch").rglob("*.py")) + sorted((ROOT / "strategies").rglob("*.py"))


def test_every_module_belongs_to_a_part():
    for path in modules():
        names = path.relative_to(ROOT).with_suffix("").parts
        if names[-1] == "__init__" and len(names) <= 2:
            continue
        assert part(".".join(names)) in RANK, f"{path.relative_to(ROOT)} is outside the layout's parts"


def test_imports_point_one_way():
    wrong = []
    for path in modules():
        me = part(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, module in project_imports(path):
            other = part(module)
            if other != me and RANK[other] >= RANK[me]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {module} ({other})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_relative_imports_cross_parts():
    """Relative imports would hide a part's dependencies from the check above: the package uses none."""
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert path.parent.name == "strategies", f"{path.relative_to(ROOT)}:{node.lineno} imports relatively"


def test_the_check_sees_a_violation(tmp_path):
    """The layering check is not vacuous: a model module importing the CLI is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from advsearch.cli.main import main\n")
    (line, module), = project_imports(bad)
    assert line == 2 and RANK[part(module)] > RANK["model"]
