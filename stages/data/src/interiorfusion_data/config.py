"""The data stage's config (`kind: data`). Unknown keys are errors, like every InteriorFusion config."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_serializer, model_validator

from interiorfusion_core.config.base import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    StageConfig,
    StageSpec,
    Strict,
    check_resolution,
)

# Room archetypes of the procedural generator (procedural.py furnishes each).
ARCHETYPES = ("bedroom", "living_room", "dining_room", "office")
Source = Literal["procedural", "meshes", "scannet", "hm3d", "front3d"]
# Sources whose on-disk layout scan_layouts.py can write (and so `importer.simulate` can simulate).
SIMULATED_SOURCES = ("scannet", "hm3d")


class ProceduralSection(Strict):
    room_kinds: list[Literal["rect", "lshape"]] = Field(default_factory=lambda: ["rect", "lshape"], min_length=1)
    # Side lengths of rectangular rooms in metres (L-shaped rooms get up to 1 m more).
    size_range: tuple[PositiveFloat, PositiveFloat] = (3.0, 7.0)
    archetypes: list[Literal[ARCHETYPES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(ARCHETYPES), min_length=1)
    min_objects: NonNegativeInt = 4
    max_objects: NonNegativeInt = 18

    @model_validator(mode="after")
    def _ranges(self) -> ProceduralSection:
        if self.size_range[0] > self.size_range[1] or self.size_range[0] < 2.0:
            raise ValueError("size_range must be [min, max] with 2 <= min <= max metres")
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        return self


class SimulateSection(Strict):
    """Simulated scans, for smoke runs and tests: instead of reading `importer.path`, the stage first writes
    `num_scenes` procedural rooms (the config's `procedural` options, generated from `seed`) in the source's own
    on-disk layout into its work dir (scan_layouts.py), then imports them with the source's real importer. Not a
    substitute for real data: the rooms are the generator's, only the file layout and the capture are a scan's."""

    num_scenes: PositiveInt = 3
    seed: NonNegativeInt = 0
    # ScanNet only (HM3D has no captured frames; null = the defaults below for scannet): frames per scan, rendered
    # inside the room at the generator's camera placement; colour and depth frame sizes [width, height] (ScanNet's
    # two cameras, each with its own intrinsics: the fields of view of ScanNet's 1296×968 colour and 640×480 depth
    # cameras at these sizes); depth imperfections: Gaussian noise with std `depth_noise`·z² metres (a
    # structured-light sensor's error grows with the square of the distance) and `depth_dropout`, the fraction of
    # pixels without depth (stored 0, like a sensor's holes).
    frames: PositiveInt | None = None
    color_size: tuple[int, int] | None = None
    depth_size: tuple[int, int] | None = None
    depth_noise: NonNegativeFloat | None = None
    depth_dropout: Probability | None = None

    @field_validator("color_size", "depth_size")
    @classmethod
    def _size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not (8 <= value[0] <= 4096 and 8 <= value[1] <= 4096):
            raise ValueError("frame sizes are [width, height] in pixels, 8 to 4096")
        return value


# `importer.simulate` keys that only the ScanNet layout has, and their defaults there.
SCANNET_SIMULATE_DEFAULTS: dict[str, Any] = {"frames": 8, "color_size": (162, 121), "depth_size": (80, 60),
                                             "depth_noise": 0.0, "depth_dropout": 0.0}


class ImporterSection(Strict):
    """Imported sources: `path` is a local directory or an s3:// / file:// prefix (or `simulate`: scans written
    by the stage itself, for smoke and tests)."""

    path: str | None = None
    simulate: SimulateSection | None = None
    # Up axis of the source files: meshes are converted to z-up metres.
    up_axis: Literal["z", "y"] = "z"
    scale: PositiveFloat = 1.0
    # 3D-FRONT: where `{jid}/raw_model.obj` lives (default: `3D-FUTURE-model` beside the JSON files).
    model_dir: str | None = None
    # Meshes folder: how many renders per object scene come from orbiting cameras (no room to stand in).
    camera_mode: Literal["auto", "inside", "orbit"] = "auto"


class VoxelSection(Strict):
    # Stored occupancy levels; the finest is voxelised, the others are exact downsamplings of it.
    resolutions: list[int] = Field(default_factory=lambda: [64], min_length=1)
    # The voxel frame (docs/data-format.md, "Frame"): every scene in a cube of `cube_size` metres, z up, centred
    # horizontally, its floor `floor_height` metres above the cube's bottom, so voxel size in metres depends only
    # on the resolution (10.24 m: 1 cm at 1024³). A scene that does not fit is refused, naming it. "fit" (opt-in)
    # fits a cube per scene instead: its bounding box plus `margin`, with no fixed metric scale.
    cube_size: PositiveFloat | Literal["fit"] = 10.24
    floor_height: NonNegativeFloat = 0.245
    # Metres of air: around the bounding box ("fit"), or at least at the cube's sides and top (metric).
    margin: NonNegativeFloat = 0.05

    @model_validator(mode="after")
    def _frame(self) -> VoxelSection:
        if self.cube_size != "fit" and self.floor_height + 2 * self.margin >= self.cube_size:
            raise ValueError(f"voxel.floor_height ({self.floor_height:g} m) leaves no room in the "
                             f"{self.cube_size:g} m cube")
        return self

    @field_validator("resolutions")
    @classmethod
    def _res(cls, value: list[int]) -> list[int]:
        for r in value:
            check_resolution(r)
        return sorted(set(value))


class RenderSection(Strict):
    views: NonNegativeInt = 4
    image_size: int = Field(default=64, ge=8, le=4096)
    # Horizontal field of view range in degrees, drawn per view.
    fov_deg: tuple[PositiveFloat, PositiveFloat] = (60.0, 80.0)

    @field_validator("fov_deg")
    @classmethod
    def _fov(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] <= value[1] < 180:
            raise ValueError("fov_deg must be [min, max] with min <= max < 180 degrees (a pinhole camera sees less "
                             "than a half-space)")
        return value
    png_compress_level: int = Field(default=1, ge=0, le=9)


class SplitSection(Strict):
    train: Probability = 0.8
    val: Probability = 0.1
    test: Probability = 0.1

    @model_validator(mode="after")
    def _sum(self) -> SplitSection:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1 (got {self.train + self.val + self.test:g})")
        return self


class ShardSection(Strict):
    samples_per_shard: PositiveInt = 64


class EditsSection(Strict):
    """Edit pairs (edits.py): for each procedural scene of `splits`, `per_scene` edited copies, each one object
    moved, removed or added, rendered with the original's cameras and lights in its voxel frame. Stored as the extra
    splits `edits-<split>`; dataset.json lists the pairs. Imported scans get none (their colours are captured)."""

    per_scene: PositiveInt = 1
    kinds: list[Literal["move", "remove", "add"]] = Field(default_factory=lambda: ["move", "remove", "add"],
                                                          min_length=1)
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "val"], min_length=1)
    # How far a moved object slides across the floor, metres (a place inside the room, clear of other objects).
    shift_m: tuple[PositiveFloat, PositiveFloat] = (0.4, 1.2)

    @model_validator(mode="after")
    def _shift(self) -> EditsSection:
        if self.shift_m[0] > self.shift_m[1]:
            raise ValueError(f"shift_m: the minimum {self.shift_m[0]:g} exceeds the maximum {self.shift_m[1]:g}")
        return self


def check_source(source: str, num_scenes: int | None, importer: ImporterSection, procedural: ProceduralSection,
                 voxel: VoxelSection) -> None:
    """The checks of one source (the single-source form's top-level keys, or one `sources` entry): ValueError
    naming the key. Fills in the ScanNet-only `importer.simulate` keys left null for a scannet source."""
    sim = importer.simulate
    if sim is not None:
        if source not in SIMULATED_SOURCES:
            raise ValueError(f"importer.simulate is only for the scan sources {' and '.join(SIMULATED_SOURCES)} "
                             f"(source is '{source}')")
        if importer.path:
            raise ValueError("importer.simulate and importer.path exclude each other: simulate writes its own scans "
                             "instead of reading a path (set one of them)")
        for key, default in SCANNET_SIMULATE_DEFAULTS.items():
            if source == "scannet" and getattr(sim, key) is None:
                setattr(sim, key, default)
            elif source != "scannet" and getattr(sim, key) is not None:
                raise ValueError(f"importer.simulate.{key}: only for source scannet ({source} scans have no "
                                 "captured frames)")
    elif source != "procedural" and not importer.path:
        hint = " or importer.simulate (smoke and tests)" if source in SIMULATED_SOURCES else ""
        raise ValueError(f"source '{source}' needs importer.path (a folder or an s3:// prefix){hint}")
    if source == "procedural" and num_scenes is None:
        raise ValueError("source 'procedural' needs num_scenes")
    generated = source == "procedural" or sim is not None
    if generated and voxel.cube_size != "fit":
        # The largest room the generator can make (L-shaped rooms get up to 1 m more) must fit the cube.
        widest = procedural.size_range[1] + (1.0 if "lshape" in procedural.room_kinds else 0.0)
        if widest + 2 * voxel.margin > voxel.cube_size or voxel.floor_height + 3.2 + voxel.margin > voxel.cube_size:
            raise ValueError(f"procedural rooms up to {widest:g} m wide do not fit voxel.cube_size "
                             f"{voxel.cube_size:g} m with {voxel.margin:g} m margin: raise cube_size or lower "
                             "procedural.size_range")


class SourceSection(Strict):
    """One entry of `sources`: the keys the single-source form has at the top level."""

    source: Source
    # Procedural: how many scenes; imports: the most scenes to take (null = all found).
    num_scenes: PositiveInt | None = None
    # Procedural rooms' seed (default: the top-level seed, which also draws the splits).
    seed: NonNegativeInt | None = None
    procedural: ProceduralSection = Field(default_factory=ProceduralSection)
    importer: ImporterSection = Field(default_factory=ImporterSection)


# The single-source form's keys that a `sources` entry holds instead.
PER_SOURCE_KEYS = ("source", "num_scenes", "procedural", "importer")


class DataStageConfig(StageConfig):
    kind: Literal["data"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="data", config_kind="data",
        description="scene shards: procedural interiors or imported meshes/scans, voxelised and rendered",
    )
    signature: ClassVar[tuple[str, ...]] = ("procedural", "voxel", "render", "splits", "importer", "sources")
    dataset: str = "InteriorFusion-Train"
    source: Source = "procedural"
    seed: NonNegativeInt = 0
    # Procedural: how many scenes; imports: the most scenes to take (null = all found).
    num_scenes: PositiveInt | None = 8
    procedural: ProceduralSection = Field(default_factory=ProceduralSection)
    importer: ImporterSection = Field(default_factory=ImporterSection)
    # Several sources in one dataset (instead of source/num_scenes/procedural/importer at the top level): every
    # scene of every entry, in entry order, keys prefixed by the source; splits over all of them.
    sources: list[SourceSection] | None = None
    voxel: VoxelSection = Field(default_factory=VoxelSection)
    render: RenderSection = Field(default_factory=RenderSection)
    splits: SplitSection = Field(default_factory=SplitSection)
    shards: ShardSection = Field(default_factory=ShardSection)
    # Worker processes building scenes (0 = in this process). Output bytes do not depend on it.
    num_workers: NonNegativeInt = 0
    # Edit pairs for the GRPO stage's edit-quality reward (null: none).
    edits: EditsSection | None = None
    preview_samples: NonNegativeInt = 4
    # The `sources` entries' single-source configs (empty in the single-source form).
    _parts: list[tuple[str, DataStageConfig]] = PrivateAttr(default_factory=list)

    @field_validator("sources")
    @classmethod
    def _sources_listed(cls, value: list[SourceSection] | None) -> list[SourceSection] | None:
        if value is not None and not value:
            raise ValueError("needs at least one entry (e.g. [{source: scannet, importer: {path: …}}]); or drop "
                             "`sources` and use the single-source form (`source:` at the top level)")
        return value

    @model_validator(mode="after")
    def _source(self) -> DataStageConfig:
        if self.sources is None:
            if self.importer.simulate is not None and "num_scenes" not in self.model_fields_set:
                self.num_scenes = None  # every simulated scan, not the import default's first 8
            check_source(self.source, self.num_scenes, self.importer, self.procedural, self.voxel)
            return self
        top = sorted(set(PER_SOURCE_KEYS) & self.model_fields_set)
        if top:
            raise ValueError(f"sources: replaces the top-level {', '.join(PER_SOURCE_KEYS)}; move '{top[0]}' into "
                             "the entries of sources")
        base = self.model_dump(mode="json")
        del base["sources"]
        names = [e.source for e in self.sources]
        parts = []
        for k, entry in enumerate(self.sources):
            try:
                check_source(entry.source, entry.num_scenes, entry.importer, entry.procedural, self.voxel)
            except ValueError as exc:
                raise ValueError(f"sources.{k} ({entry.source}): {exc}") from None
            sub = {**base, **entry.model_dump(mode="json", exclude={"seed"}),
                   "seed": self.seed if entry.seed is None else entry.seed}
            part = DataStageConfig.model_validate(sub)
            # Keys are prefixed by the source, by its position too where a source is listed twice.
            parts.append((entry.source if names.count(entry.source) == 1 else f"{entry.source}{k}", part))
        self._parts = parts
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # The resolved config holds one form: `sources` (the top-level per-source keys would be unused defaults)
        # or the single source, without the keys that are null when unused (`sources`, `importer.simulate`), so a
        # config written before they existed keeps its digest and its cached runs.
        data = handler(self)
        if self.edits is None:
            data.pop("edits", None)
        if self.sources is None:
            data.pop("sources", None)
            if self.importer.simulate is None and isinstance(data.get("importer"), dict):
                data["importer"].pop("simulate", None)
        else:
            for key in PER_SOURCE_KEYS:
                data.pop(key, None)
        return data

    def source_parts(self) -> list[tuple[str | None, DataStageConfig]]:
        """The dataset's sources in order: (key prefix, that source's single-source config). The single-source
        form is one part, (None, self); a `sources` entry's config is this one with the entry's keys."""
        return list(self._parts) if self.sources is not None else [(None, self)]
