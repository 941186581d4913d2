"""The repository must not shadow the PyPI package `kernels`, which transformers (>= 5.25) requires and
imports: run from the repository root (python -m pytest, python -m avmp_triton), the current folder
comes first on sys.path, so a top-level kernels/ folder would be imported in its place."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_top_level_kernels_package():
    assert not (REPO / "kernels").exists()
    spec = importlib.util.find_spec("kernels")
    where = [] if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
    assert not any(str(p).startswith(str(REPO) + "/kernels") for p in where), where


def test_kernels_live_in_the_package():
    import avmp_triton.kernels.paged_attention as k
    assert Path(k.__file__).resolve().parent == REPO / "avmp_triton" / "kernels"


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists the packages by hand (no discovery, see the comment there): a package
    folder missing from the list would be left out of a built wheel."""
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "avmp_triton").rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
