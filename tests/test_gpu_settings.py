"""mirascore.gpu.settings: one record of GPU settings, changed only through configure / using,
checked on the host (no GPU needed: nothing here touches CuPy until a handle exists)."""
import pytest

from mirascore.gpu import settings


def test_configure_returns_the_previous_settings_and_using_restores_them():
    before = settings.current()
    previous = settings.configure(max_graphs=3)
    try:
        assert previous == before and settings.current().max_graphs == 3
        with settings.using(cuda_graphs=False, max_graphs=5) as inside:
            assert inside == settings.current() and not inside.cuda_graphs and inside.max_graphs == 5
        assert settings.current().max_graphs == 3 and settings.current().cuda_graphs == before.cuda_graphs
    finally:
        settings.configure(**before._asdict())
    assert settings.current() == before


@pytest.mark.parametrize("change, match", [
    (dict(tf_32=True), "unknown GPU setting 'tf_32'"),
    (dict(tf32="yes"), r"tf32 must be True or False, got 'yes'"),
    (dict(max_graphs=0), "max_graphs must be a positive integer, got 0"),
    (dict(blas_workspace_bytes=1.5), "blas_workspace_bytes must be a positive integer"),
])
def test_bad_settings_name_the_setting(change, match):
    before = settings.current()
    with pytest.raises(ValueError, match=match):
        settings.configure(**change)
    assert settings.current() == before
