"""The latent API (interiorfusion_vae.latents, docs/latents.md): what the encode job writes and what the structure
and material stages read. Most tests encode the smoke data with a small untrained VAE (seconds); the slow ones use
the trained smoke VAE (shared with test_vae_stage) and a 2-process run of the stage."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from testservers import REPO

from interiorfusion_core.config import load_config
from interiorfusion_core.contract import RunOutcome
from interiorfusion_core.engine.trainer import cpu_threads
from interiorfusion_core.errors import ConfigError, UserError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.stage import StageInput
from interiorfusion_core.storage import open_store
from interiorfusion_data.format import SampleError
from interiorfusion_data.loader import open_dataset
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.evaluate import class_prior, evaluate_samples
from interiorfusion_vae.latents import (
    LATENT_FORMAT,
    LatentDataset,
    TokenBudgetBatchSampler,
    collate_latents,
    decode,
    decode_geometry,
    encode_dataset,
    encode_sample,
    open_latents,
)
from interiorfusion_vae.model import SLATInteriorVAE
from interiorfusion_vae.task import build_vae, mean_material

SMOKE = REPO / "configs/smoke/vae.yaml"
SPLITS = ("train", "val", "test")
# A narrower smoke VAE (the smoke widths would only make encoding slower) and 3 samples per shard, so the train
# split spans several shards.
SMALL = ["model.channels=[4,4,8,8,8]", "encode.samples_per_shard=3"]


@pytest.fixture(scope="module")
def small(smoke_data: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every split of the smoke data encoded at 32³ and 64³ by an untrained small VAE, outside a stage run."""
    config: VAEPretrainConfig = load_config(SMOKE, SMALL).model
    torch.manual_seed(0)
    model = build_vae(config)
    model.set_material_prior(mean_material(smoke_data, config.model.target_resolution))
    root = tmp_path_factory.mktemp("latents-small")
    result = encode_dataset(open_store(root / "out"), model.eval(), smoke_data, config, work_dir=root / "work")
    return {"uri": (root / "out").as_uri(), "root": root / "out", "model": model, "config": config,
            "data": smoke_data, "metrics": result.metrics}


def _open(small: dict[str, Any], split: str = "train", resolution: int | None = None,
          normalized: bool = True) -> LatentDataset:
    return open_latents(small["uri"], split, resolution, normalized=normalized, require_manifest=False)


def _voxels(data_uri: str, split: str, index: int, resolution: int) -> dict[str, Any]:
    return open_dataset(data_uri, split).get(index, resolution, fields=("voxels",))


# ---------------------------------------------------------------------------------------------- config
def test_encode_resolutions_default_to_the_curriculum_and_are_checked() -> None:
    assert load_config(SMOKE).model.encode.resolutions == [32, 64]
    assert load_config(REPO / "configs/vae_pretrain.yaml").model.encode.resolutions == [256, 512, 1024]
    assert load_config(SMOKE, ["encode.resolutions=[64, 32]"]).model.encode.resolutions == [32, 64]
    # 6 channel levels = 32× compression: a 32³ grid would leave a 1³ latent.
    six = ["model.channels=[4,4,4,4,4,4]", "model.base_resolution=64", "training.curriculum.0.resolution=64",
           "training.curriculum.1.resolution=128", "model.target_resolution=128"]
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [*six, "encode.resolutions=[32, 128]"])
    assert str(err.value) == (f"{SMOKE}: encode.resolutions.0: 32 must be a multiple of the VAE's 32× compression "
                              "with a latent grid of at least 2³ (32 / 32 = 1); encode at 64 or more")
    for bad, says in (("[48]", "power of two"), ("[64, 64]", "64 listed more than once")):
        with pytest.raises(ConfigError, match=says):
            load_config(SMOKE, [f"encode.resolutions={bad}"])


# ---------------------------------------------------------------------------------------------- writer → reader
def test_round_trip_applies_and_inverts_the_train_statistics(small: dict[str, Any]) -> None:
    raw, norm = _open(small, normalized=False), _open(small)
    assert len(raw) == len(norm) == len(open_dataset(small["data"], "train"))
    # The stored latents are the model's μ of each data sample, in the encoder's row order.
    for i in range(len(raw)):
        coords, feats = raw.read_raw(i)
        mu = encode_sample(small["model"], _voxels(small["data"], "train", raw[i]["index"], 64))
        assert torch.equal(coords, mu.coords[:, 1:].int()) and torch.equal(feats, mu.feats)
    # The statistics are the per-channel mean/std of every train token.
    everything = torch.cat([raw[i]["feats"] for i in range(len(raw))]).double()
    index = json.loads((small["root"] / "latents/index.json").read_text())
    stats = index["resolutions"]["64"]["normalization"]
    assert stats["split"] == "train" and stats["tokens"] == len(everything) == int(raw.token_counts().sum())
    np.testing.assert_allclose(stats["mean"], everything.mean(0).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], everything.std(0, unbiased=False).numpy(), rtol=1e-9)
    mean, std = torch.tensor(stats["mean"], dtype=torch.float64), torch.tensor(stats["std"], dtype=torch.float64)
    normalised = []
    for i in range(len(raw)):
        r, n = raw[i], norm[i]
        assert n["normalized"] and not r["normalized"] and torch.equal(n["coords"], r["coords"])
        assert torch.equal(n["feats"], ((r["feats"].double() - mean) / std).float())
        back = norm.denormalize(n)
        assert not back["normalized"] and back["geometry"].shape[1] == raw.latent_dim
        torch.testing.assert_close(back["feats"], r["feats"], rtol=1e-6, atol=1e-7)  # float32 rounding only
        torch.testing.assert_close(norm.normalize(back)["feats"], n["feats"], rtol=1e-6, atol=1e-6)
        normalised.append(n["feats"].double())
    z = torch.cat(normalised)
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(z.shape[1], dtype=torch.float64), atol=1e-5,
                               rtol=0)
    # Half the channels: a geometry generator's output maps back with the geometry statistics.
    g = norm[0]["geometry"]
    assert torch.equal(norm.denormalize(g, "geometry"), norm.denormalize(norm[0])["geometry"])
    with pytest.raises(ValueError, match="channels='geometry' or 'material'"):
        norm.denormalize(g)


def test_counts_offsets_and_one_ranged_read_per_sample(small: dict[str, Any]) -> None:
    ds = _open(small, normalized=False)
    index = json.loads((small["root"] / "latents/index.json").read_text())
    entry = index["resolutions"]["64"]["splits"]["train"]
    assert len(entry["shards"]) == 3  # 8 samples, 3 per shard
    assert entry["samples"] == len(ds) and entry["tokens"] == int(ds.token_counts().sum())
    counts = ds.token_counts()
    for i in range(len(ds)):
        assert counts[i] == len(ds[i]["coords"]) == ds[i]["tokens"]
    for shard in entry["shards"]:
        path = small["root"] / shard["shard"]
        whole = load_file(str(path))  # a standard safetensors file
        (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
        samples = json.loads((small["root"] / shard["index"]).read_text())["samples"]
        assert samples[0]["offset"] == 8 + header_len
        for s, nxt in itertools.pairwise(samples):  # blocks adjacent: no holes, no overlaps
            assert s["offset"] + s["size"] == nxt["offset"]
        assert samples[-1]["offset"] + samples[-1]["size"] == path.stat().st_size
        for s in samples:
            coords, feats = ds.read_raw(ds.position(s["key"]))
            assert torch.equal(coords, whole[f"{s['position']:06d}.coords"])
            assert torch.equal(feats, whole[f"{s['position']:06d}.feats"])
            assert s["tokens"] == len(coords) and s["size"] == len(coords) * (3 + ds.channels) * 4


def test_token_budget_batches_never_exceed_the_budget(small: dict[str, Any]) -> None:
    ds = _open(small)
    counts = ds.token_counts()
    for budget in (int(counts.max()), int(counts.max()) + 7, 2 * int(counts.max()), int(counts.sum())):
        for shuffle in (False, True):
            batches = ds.batches(budget, shuffle=shuffle, seed=3)
            assert all(int(counts[b].sum()) <= budget for b in batches)
            assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert ds.batches(10**9) == [list(range(len(ds)))]
    assert all(len(b) <= 2 for b in ds.batches(10**9, max_samples=2))
    # Seeded per epoch: the same order for the same (seed, epoch), another order next epoch.
    budget = 2 * int(counts.max())
    assert ds.batches(budget, shuffle=True, epoch=1) == ds.batches(budget, shuffle=True, epoch=1)
    assert ds.batches(budget, shuffle=True, epoch=1) != ds.batches(budget, shuffle=True, epoch=2)
    # Two ranks: disjoint batches, the same number on each.
    ranks = [ds.batches(int(counts.max()), shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) >= 1
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    # Through a torch DataLoader.
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ds.batch_sampler(budget), collate_fn=collate_latents)
    seen = 0
    for batch in loader:
        assert int(batch["num_tokens"].sum()) <= budget and batch["coords"].shape[1] == 4
        assert int(batch["coords"][:, 0].max()) == len(batch["keys"]) - 1
        seen += len(batch["keys"])
    assert seen == len(ds)
    with pytest.raises(UserError, match=f"has {int(counts.max())} latent tokens, more than max_tokens"):
        ds.batches(int(counts.max()) - 1)
    # Many random samples, many budgets.
    rng = np.random.default_rng(0)
    lots = rng.integers(1, 5000, 2000)
    for budget in (5000, 7919, 20000):
        sampler = TokenBudgetBatchSampler(lots, budget, shuffle=True, seed=1)
        got = list(sampler)
        assert len(got) == len(sampler) and all(int(lots[b].sum()) <= budget for b in got)
        assert sorted(i for b in got for i in b) == list(range(len(lots)))


def test_an_unknown_format_is_refused_in_one_sentence_naming_the_file(small: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small["root"], copy)
    index_path = copy / "latents/index.json"
    index = json.loads(index_path.read_text())

    def refusal() -> str:
        with pytest.raises(UserError) as err:
            open_latents(copy.as_uri(), require_manifest=False)
        return str(err.value)

    index_path.write_text(json.dumps({**index, "format": "interiorfusion.latents/1"}))
    msg = refusal()
    assert msg.startswith(f"{index_path.as_uri()}: latent format 'interiorfusion.latents/1' is not one this reader "
                          f"knows ({LATENT_FORMAT})")
    assert "\n" not in msg and ". " not in msg  # one sentence
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k != "format"}))  # a /1 index had none
    assert "latent format None is not one" in refusal()
    # A shard index changed after the index recorded it is refused (sha256), one of another format by its format.
    entry = index["resolutions"]["64"]["splits"]["train"]["shards"][0]
    shard_index = copy / entry["index"]
    shard_index.write_text(shard_index.read_text().replace(LATENT_FORMAT, "interiorfusion.latents/9"))
    index_path.write_text(json.dumps(index))
    assert f"checksum mismatch for '{entry['index']}'" in refusal()
    entry["index_sha256"] = hashlib.sha256(shard_index.read_bytes()).hexdigest()
    index_path.write_text(json.dumps(index))
    assert refusal().startswith(f"{shard_index.as_uri()}: latent format 'interiorfusion.latents/9' is not one")
    # A corrupt sample is named when read (its block's sha256), like a corrupt data sample.
    shutil.rmtree(copy)
    shutil.copytree(small["root"], copy)
    ds = open_latents(copy.as_uri(), require_manifest=False)
    shard = copy / ds.refs[0].shard
    blob = bytearray(shard.read_bytes())
    blob[ds.refs[0].offset + 5] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(SampleError, match=f"{ds.refs[0].key}: sha256 mismatch"):
        ds[0]


def test_keys_join_the_latents_to_their_samples_in_the_data_shards(small: dict[str, Any], tmp_path: Path) -> None:
    for split in SPLITS:
        data = open_dataset(small["data"], split)
        for res in (32, 64):
            ds = _open(small, split, res)
            assert ds.keys == [data.get(i, fields=())["key"] for i in range(len(data))]
            for i in range(len(ds)):
                s = ds[i]
                truth = data.get(s["index"], res, fields=("voxels",))
                assert s["key"] == truth["key"] and s["resolution"] == truth["resolution"] == res
                # The metric frame: origin and voxel size are the data sample's (stored there as float32).
                assert np.array_equal(s["origin"].numpy().astype(np.float32), truth["origin"])
                assert np.float32(s["voxel_size"]) == truth["voxel_size"]
                assert s["latent_voxel_size"] == pytest.approx(s["voxel_size"] * ds.compression)
                centre = ds.frame(i).voxel_to_world(s["coords"][:1].numpy(), ds.latent_resolution)
                lo = s["origin"].numpy() + s["coords"][0].numpy() * s["latent_voxel_size"]
                np.testing.assert_allclose(centre[0], lo + 0.5 * s["latent_voxel_size"])
        assert ds.open_data(small["data"]).split == split
    # Latents of other data are refused by the join: here an index claiming another data digest.
    copy = tmp_path / "copy"
    shutil.copytree(small["root"], copy)
    index = json.loads((copy / "latents/index.json").read_text())
    index["data"]["digest"] = "0" * 64
    (copy / "latents/index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="is not the data these latents were encoded from"):
        open_latents(copy.as_uri(), require_manifest=False).open_data(small["data"])


def test_latents_at_both_smoke_resolutions(small: dict[str, Any]) -> None:
    assert _open(small).resolution == 64  # default: the target resolution
    by_res = {res: _open(small, "train", res, normalized=False) for res in (32, 64)}
    assert by_res[64].resolutions == [32, 64]
    for res, ds in by_res.items():
        assert ds.latent_resolution == res // 16
        assert all(int(ds[i]["coords"].max()) < ds.latent_resolution for i in range(len(ds)))
        assert int(ds.token_counts().max()) <= ds.latent_resolution**3
        mu = encode_sample(small["model"], _voxels(small["data"], "train", ds[0]["index"], res))
        assert torch.equal(ds[0]["feats"], mu.feats)
    assert by_res[32].keys == by_res[64].keys
    assert (by_res[32].token_counts() <= by_res[64].token_counts()).all()
    assert not torch.equal(by_res[32].stats.mean, by_res[64].stats.mean)  # each grid has its own statistics
    with pytest.raises(UserError, match=r"no latents at resolution 128 \(encoded: 32, 64\)"):
        _open(small, "train", 128)


def test_only_the_configured_splits_are_kept_but_statistics_come_from_train(small: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    config: VAEPretrainConfig = load_config(SMOKE, [*SMALL, "encode.splits=[val]"]).model
    out = open_store(tmp_path / "out")
    out.put_bytes("latents/64/train/shard-r00007-00000.json", b"{}")  # an interrupted attempt's leftover
    encode_dataset(out, small["model"], small["data"], config, work_dir=tmp_path / "work")
    assert not out.exists("latents/64/train/shard-r00007-00000.json")
    index = json.loads(out.get_bytes("latents/index.json"))
    full = json.loads((small["root"] / "latents/index.json").read_text())
    for res in ("32", "64"):
        assert list(index["resolutions"][res]["splits"]) == ["val"]
        assert index["resolutions"][res]["normalization"] == full["resolutions"][res]["normalization"]
    assert not any("/train/" in k for k in out.list("latents"))


@pytest.mark.servers
def test_written_to_and_read_from_s3(small: dict[str, Any], s3_env: str, tmp_path: Path) -> None:
    config: VAEPretrainConfig = load_config(SMOKE, [*SMALL, "encode.resolutions=[32]", "encode.splits=[val]"]).model
    encode_dataset(open_store(s3_env), small["model"], small["data"], config, work_dir=tmp_path)
    remote = open_latents(s3_env, "val", 32, require_manifest=False)  # shard indexes, then one ranged GET per sample
    local = _open(small, "val", 32)
    assert remote.keys == local.keys and remote.token_counts().tolist() == local.token_counts().tolist()
    for i in range(len(local)):
        assert torch.equal(remote[i]["coords"], local[i]["coords"]) and torch.equal(remote[i]["feats"],
                                                                                     local[i]["feats"])


# ---------------------------------------------------------------------------------------------- decoding
def test_decode_takes_what_the_dataset_yields(small: dict[str, Any]) -> None:
    model: SLATInteriorVAE = small["model"]
    raw, norm = _open(small, "val", normalized=False), _open(small, "val")
    for i in range(len(raw)):
        mu = encode_sample(model, _voxels(small["data"], "val", raw[i]["index"], 64))
        want = model.decode(mu)
        got = decode(model, raw[i])
        assert got.voxels.spatial_shape == (64, 64, 64)
        assert torch.equal(got.voxels.coords, want.voxels.coords) and torch.equal(got.material, want.material)
        assert torch.equal(got.occupancy_logits, want.occupancy_logits)
        # Normalised latents go through denormalize first (float32 rounding: the decode agrees closely).
        again = decode(model, norm.denormalize(norm[i]))
        if torch.equal(again.voxels.coords, want.voxels.coords):
            torch.testing.assert_close(again.material, want.material, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="these latents are normalised"):
        decode(model, norm[0])
    batch = decode(model, collate_latents([raw[0], raw[1]]))
    assert batch.voxels.batch_size == 2
    alone = decode(model, raw[1])
    assert torch.equal(batch.material[batch.voxels.coords[:, 0] == 1], alone.material)
    with pytest.raises(ValueError, match="use decode_geometry"):
        decode(model, {**raw[0], "feats": raw[0]["geometry"]})


def test_decode_geometry_takes_geometry_latents(small: dict[str, Any]) -> None:
    model: SLATInteriorVAE = small["model"]
    raw = _open(small, "val", normalized=False)
    mu = encode_sample(model, _voxels(small["data"], "val", raw[0]["index"], 64))
    want = model.decode_geometry(mu.replace(mu.feats[:, : model.latent_dim]))
    for given in (raw[0], {**raw[0], "feats": raw[0]["geometry"]}):  # a full sample, or its geometry half
        got = decode_geometry(model, given)
        assert torch.equal(got.voxels.coords, want.voxels.coords)
        assert torch.equal(got.occupancy_logits, want.occupancy_logits)


# ---------------------------------------------------------------------------------------------- the stage
@pytest.mark.slow
def test_the_stage_writes_the_trained_models_latents(vae_smoke: tuple[RunOutcome, str]) -> None:
    outcome, data_uri = vae_smoke
    manifest = read_manifest(outcome.uri)
    config = VAEPretrainConfig.model_validate(manifest.config)
    model = _trained(outcome.uri, config)
    # What a downstream stage gets for its `latents` input: a StageInput (verified manifest + store).
    latents = StageInput("latents", outcome.uri, manifest, open_store(outcome.uri))
    for res in (32, 64):
        ds = open_latents(latents, "val", res, normalized=False)
        assert ds.data_uri == data_uri and ds.open_data().split == "val"
        for i in range(len(ds)):
            with _stage_threads(config):
                mu = encode_sample(model, _voxels(data_uri, "val", ds[i]["index"], res))
            assert torch.equal(ds[i]["feats"], mu.feats) and torch.equal(ds[i]["coords"], mu.coords[:, 1:].int())
    # Every latent file is in the manifest with its sha256, and the index names only those.
    store = open_store(outcome.uri)
    on_disk = set(store.list("latents"))
    assert on_disk <= set(manifest.artifacts)
    for key in on_disk:
        assert store.stat(key).sha256 == manifest.artifacts[key].sha256
    assert manifest.metrics["encode_samples"] == sum(len(open_dataset(data_uri, s)) for s in SPLITS)


@contextmanager
def _stage_threads(config: VAEPretrainConfig) -> Iterator[None]:
    """Encode with the stage's intra-op thread count: CPU matmuls sum in a thread-dependent order, so bit-exact
    comparisons with what the stage wrote hold only at its count (the process-wide count is whatever ran last)."""
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(config.training.cpu_threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trained(uri: str, config: VAEPretrainConfig) -> SLATInteriorVAE:
    manifest = read_manifest(uri)
    key = f"{manifest.outputs['checkpoint']}/model.safetensors"
    model = build_vae(config)
    model.load_state_dict(load_file(str(open_store(uri).open_local(key, manifest.artifacts[key].sha256))))
    return model.eval()


TINY = ["training.max_steps=4", "training.curriculum.0.steps=2", "training.curriculum.1.steps=2",
        "training.batch_size=1", "training.val_batches=1", "loss.render_views=1", "encode.eval_samples=4", *SMALL]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_encode_the_same_latents_as_one(smoke_data: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests/engine"))
    from test_engine_program import child_env, launch_2_processes

    env: dict[str, str] = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
    launcher = launch_2_processes("ddp", env)
    out = tmp_path / "two"
    sets = [a for s in TINY for a in ("--set", s)]
    run = subprocess.run([*launcher, "-m", "interiorfusion_vae", "--config", str(SMOKE), *sets,
                          "--input", f"data={smoke_data}", "--output", out.as_uri()],
                         env=child_env(tmp_path, **env), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "engine: DDP on 2× cpu" in run.stderr
    manifest = read_manifest(out.as_uri())
    index = json.loads((out / "latents/index.json").read_text())
    assert index["world_size"] == 2
    # Both ranks wrote shards, and rank 0's manifest lists every one of them with its sha256.
    files = {str(p.relative_to(out)) for p in (out / "latents").rglob("*") if p.is_file()}
    assert {f for f in files if "shard-r00001-" in f} and {f for f in files if "shard-r00000-" in f}
    assert files <= set(manifest.artifacts)
    store = open_store(out.as_uri())
    assert all(store.stat(f).sha256 == manifest.artifacts[f].sha256 for f in files)

    # One process, the same trained weights: the same latents, sample for sample, bit for bit.
    config = VAEPretrainConfig.model_validate(manifest.config)
    model = _trained(out.as_uri(), config)
    one = open_store(tmp_path / "one")
    with _stage_threads(config):
        encode_dataset(one, model, smoke_data, config, work_dir=tmp_path / "work")
    for res in (32, 64):
        for split in SPLITS:
            a = open_latents(out.as_uri(), split, res, normalized=False)
            b = open_latents(one, split, res, normalized=False, require_manifest=False)
            assert a.keys == b.keys and len(a) == len(open_dataset(smoke_data, split))
            for i in range(len(a)):
                assert torch.equal(a[i]["coords"], b[i]["coords"]) and torch.equal(a[i]["feats"], b[i]["feats"])
        # The statistics merge per-rank moments: equal up to float64 rounding of the merge order.
        torch.testing.assert_close(a.stats.mean, b.stats.mean, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(a.stats.std, b.stats.std, rtol=1e-12, atol=1e-15)
    # Evaluation was sharded too: rank 0 gathered every held-out record, equal to one process's.
    report = json.loads((out / "eval.json").read_text())
    held = len(open_dataset(smoke_data, config.encode.eval_split))
    indices = list(range(min(held, config.encode.eval_samples)))
    assert [r["index"] for r in report["per_sample"]] == indices
    res = config.model.target_resolution
    assert report["per_sample"] == evaluate_samples(model, smoke_data, config, res, indices,
                                                    mean_material(smoke_data, res),
                                                    majority_class=class_prior(smoke_data, res))
