"""Stage outputs several test packages share, each made once per test session: the smoke data (seconds), one trained
smoke VAE (about two minutes on two cores), one structure stage trained on its latents, one material stage on
both, the smoke evaluation of those two, the smoke real scans, one LoRA stage on them and one GRPO stage.
Registered as a pytest plugin by tests/conftest.py so every test package uses the same runs."""

from __future__ import annotations

import time

import pytest
from testservers import REPO

from interiorfusion_core.contract import RunOutcome, run_stage


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URI of the smoke data stage's output (12 procedural rooms at 32³ and 64³)."""
    root = tmp_path_factory.mktemp("vae-smoke-data")
    return run_stage("data", REPO / "configs/smoke/data.yaml", output=(root / "data").as_uri()).uri


@pytest.fixture(scope="session")
def vae_smoke(smoke_data: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunOutcome, str]:
    """The smoke VAE stage trained on `smoke_data`: (its outcome, the data URI)."""
    root = tmp_path_factory.mktemp("vae-smoke")
    vae = run_stage("vae", REPO / "configs/smoke/vae.yaml", inputs={"data": smoke_data},
                    output=(root / "vae").as_uri())
    return vae, smoke_data


@pytest.fixture(scope="session")
def structure_smoke(vae_smoke: tuple[RunOutcome, str], tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    """The smoke structure stage trained on `vae_smoke`'s latents (about a minute on two cores)."""
    root = tmp_path_factory.mktemp("structure-smoke")
    return run_stage("structure", REPO / "configs/smoke/structure.yaml", inputs={"latents": vae_smoke[0].uri},
                     output=(root / "structure").as_uri())


@pytest.fixture(scope="session")
def material_smoke(vae_smoke: tuple[RunOutcome, str], structure_smoke: RunOutcome,
                   tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    """The smoke material stage on `vae_smoke`'s latents, textured end to end with `structure_smoke`."""
    root = tmp_path_factory.mktemp("material-smoke")
    return run_stage("material", REPO / "configs/smoke/material.yaml",
                     inputs={"latents": vae_smoke[0].uri, "structure": structure_smoke.uri},
                     output=(root / "material").as_uri())


@pytest.fixture(scope="session")
def real_smoke_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URI of the smoke real scans (configs/smoke/real.yaml: simulated ScanNet and HM3D scans, imported)."""
    root = tmp_path_factory.mktemp("real-smoke-data")
    return run_stage("data", REPO / "configs/smoke/real.yaml", output=(root / "real").as_uri()).uri


@pytest.fixture(scope="session")
def lora_smoke(structure_smoke: RunOutcome, real_smoke_data: str, tmp_path_factory: pytest.TempPathFactory
               ) -> RunOutcome:
    """The smoke LoRA stage: `structure_smoke` tuned on `real_smoke_data`."""
    root = tmp_path_factory.mktemp("lora-smoke")
    return run_stage("lora", REPO / "configs/smoke/lora.yaml",
                     inputs={"structure": structure_smoke.uri, "data": real_smoke_data},
                     output=(root / "lora").as_uri())


@pytest.fixture(scope="session")
def grpo_smoke(structure_smoke: RunOutcome, tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    """The smoke GRPO stage on `structure_smoke` (its own training rooms' condition views as prompts)."""
    root = tmp_path_factory.mktemp("grpo-smoke")
    return run_stage("grpo", REPO / "configs/smoke/grpo.yaml", inputs={"structure": structure_smoke.uri},
                     output=(root / "grpo").as_uri())


@pytest.fixture(scope="session")
def evaluate_smoke(structure_smoke: RunOutcome, material_smoke: RunOutcome,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[RunOutcome, float]:
    """The smoke evaluate stage on `structure_smoke` and `material_smoke`, and its wall time (s)."""
    out = tmp_path_factory.mktemp("evaluate") / "eval"
    started = time.perf_counter()
    outcome = run_stage("evaluate", REPO / "configs/smoke/evaluate.yaml",
                        inputs={"structure": structure_smoke.uri, "material": material_smoke.uri},
                        output=out.as_uri())
    return outcome, time.perf_counter() - started
