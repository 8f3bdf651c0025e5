"""Contracts of the codebase that reviews check: self-contained remote code, no print or torch.load in library
code, no machine paths."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE = ["configuration_lavit.py", "modeling_lavit.py", "processing_lavit.py"]


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or "").split(".")[0])
    return names


def library_files() -> list[Path]:
    return sorted(p for p in ROOT.glob("*.py") if p.name != "setup.py")


def test_remote_code_is_self_contained():
    allowed_third_party = {"torch", "transformers", "__future__", "math", "re", "typing", "dataclasses"}
    local = {p.stem for p in ROOT.glob("*_lavit.py")}
    for name in REMOTE_CODE:
        imports = imports_of(ROOT / name)
        foreign = {i for i in imports if i.lstrip(".") not in allowed_third_party and not i.startswith(".")}
        # A local module may appear only as the fallback of a relative import of the same module.
        assert foreign <= {i.lstrip(".") for i in imports if i.startswith(".")}, (name, foreign)
        assert not {i.lstrip(".") for i in imports} & {"trainer_lavit", "conversion_lavit", "testing_lavit"}
        assert all(i.lstrip(".") in local for i in imports if i.startswith(".")), name
    assert imports_of(ROOT / "configuration_lavit.py") <= {"transformers", "__future__"}


def test_no_print_or_torch_load_in_library_code():
    for path in library_files():
        text = path.read_text()
        assert not re.search(r"^\s*print\(", text, re.M), path.name
        assert "torch.load(" not in text, path.name


def test_no_machine_paths_in_tracked_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"(/root/|/home/|/work/|/tmp/[A-Za-z])")
    offenders = [f for f in files if not f.startswith("tests/") and (ROOT / f).is_file()
                 and f.endswith((".py", ".cfg", ".toml", ".yaml", ".md")) and pattern.search((ROOT / f).read_text())]
    assert offenders == []


# What each module may import of the project (README "Architecture", in pipeline order): nothing runs sideways
# (a stage reaching into another for a helper both need: that helper lives below both) or backwards.
MAY_IMPORT = {
    "cli_lavit": set(),
    "testing_lavit": set(),
    "configuration_lavit": set(),
    "processing_lavit": {"configuration_lavit"},
    "modeling_lavit": {"configuration_lavit"},
    "conversion_lavit": {"cli_lavit", "configuration_lavit", "modeling_lavit", "processing_lavit"},
    "data_lavit": set(),
    "teacher_lavit": {"cli_lavit", "data_lavit", "modeling_lavit", "processing_lavit"},
    "builder_lavit": {"cli_lavit", "data_lavit", "modeling_lavit", "teacher_lavit"},
    "trainer_lavit": {"cli_lavit", "configuration_lavit", "data_lavit", "modeling_lavit", "processing_lavit"},
    "evaluation_lavit": {"cli_lavit", "data_lavit", "modeling_lavit", "processing_lavit"},
    "lmms_eval_lavit": {"cli_lavit", "evaluation_lavit", "processing_lavit"},
    "analysis_lavit": {"data_lavit", "teacher_lavit"},
    "publishing_lavit": {"configuration_lavit", "data_lavit", "evaluation_lavit", "modeling_lavit",
                         "processing_lavit"},
    "synthetic_lavit": {"data_lavit", "evaluation_lavit"},
    "grounding_lavit": {"data_lavit", "modeling_lavit", "trainer_lavit"},
    "report_lavit": {"analysis_lavit", "evaluation_lavit"},
    # the end of the pipeline: it runs every stage
    "quickstart_lavit": {"analysis_lavit", "builder_lavit", "cli_lavit", "configuration_lavit", "conversion_lavit",
                         "data_lavit", "evaluation_lavit", "grounding_lavit", "modeling_lavit", "processing_lavit",
                         "report_lavit", "synthetic_lavit", "teacher_lavit", "testing_lavit", "trainer_lavit"},
}


def test_every_module_imports_only_what_its_stage_may():
    modules = {p.stem for p in ROOT.glob("*_lavit.py")}
    assert modules == set(MAY_IMPORT), "a new module needs its line in MAY_IMPORT and in the README's Architecture"
    for name in sorted(modules):
        project = {i.lstrip(".") for i in imports_of(ROOT / f"{name}.py")} & modules
        assert project <= MAY_IMPORT[name], f"{name} imports {sorted(project - MAY_IMPORT[name])}"


def test_no_example_is_imported_by_the_library():
    examples = {p.stem for p in (ROOT / "examples").glob("*.py")}
    for path in library_files():
        assert not imports_of(path) & examples, path.name
