"""The package names an untested Triton in one warning line, and only then."""
import warnings

import pytest
import triton

from avmp_triton import _triton_env


@pytest.mark.parametrize("version,warns", [("3.6.0", False), ("3.9.0", False), ("3.9.1", False),
                                           ("3.5.1", True), ("3.10.0", True), ("4.0.0", True), ("dev", True)])
def test_untested_triton_is_named(version, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _triton_env.warn_if_untested(version) is warns
    assert len(caught) == int(warns)
    if warns:
        msg = str(caught[0].message)
        assert f"triton {version} is installed" in msg and "\n" not in msg


def test_installed_triton_is_tested():
    """CI installs the two ends of the range; a third version here means the range needs updating."""
    assert not _triton_env.warn_if_untested(triton.__version__)
