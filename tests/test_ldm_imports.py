"""ldm/ is the model library: pure torch, no infrastructure (STYLE.md)."""
import ast
import pathlib

FORBIDDEN = ("ray", "hydra", "omegaconf", "wandb", "deepspeed", "webdataset", "torch.distributed")
LDM = pathlib.Path(__file__).resolve().parents[1] / "ldm"


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _forbidden(name):
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


def test_ldm_imports_no_infrastructure():
    files = sorted(LDM.rglob("*.py"))
    assert files, "ldm/ has no modules"
    offenders = {
        str(f.relative_to(LDM)): sorted(n for n in _imported_modules(f) if _forbidden(n))
        for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_ldm_source_has_no_torch_distributed_attribute_use():
    # `import torch` then `torch.distributed.all_reduce(...)` escapes the import check.
    for f in LDM.rglob("*.py"):
        assert "torch.distributed" not in f.read_text(), f


def test_checker_catches_forbidden_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ray\nfrom torch.distributed import all_reduce\nfrom hydra.utils import x\n")
    assert sorted(n for n in _imported_modules(bad) if _forbidden(n)) == [
        "hydra.utils", "hydra.utils.x", "ray", "torch.distributed", "torch.distributed.all_reduce"]
