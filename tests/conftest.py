"""Shared fixtures: one local Ray instance per test session, GPU skipping."""
import os

import pytest


def _has_gpu():
    try:
        from distgrad._backend import cupy_module
        cupy_module()
        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs cupy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (started on first use)."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, num_cpus=4,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                     + os.environ.get("PYTHONPATH", "").split(os.pathsep))}})
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def backend(request):
    """Each distributed backend in turn: the in-process one, then Ray (the shared instance)."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return request.param
