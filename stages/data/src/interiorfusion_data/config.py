"""The data stage's config (`kind: data`). Unknown keys are errors, like every InteriorFusion config."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

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


class ImporterSection(Strict):
    """Imported sources: `path` is a local directory or an s3:// / file:// prefix."""

    path: str | None = None
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


class DataStageConfig(StageConfig):
    kind: Literal["data"] | None = None
    stage: ClassVar[StageSpec] = StageSpec(
        name="data", config_kind="data",
        description="scene shards: procedural interiors or imported meshes/scans, voxelised and rendered",
    )
    signature: ClassVar[tuple[str, ...]] = ("procedural", "voxel", "render", "splits", "importer")
    dataset: str = "InteriorFusion-Train"
    source: Literal["procedural", "meshes", "scannet", "hm3d", "front3d"] = "procedural"
    seed: NonNegativeInt = 0
    # Procedural: how many scenes; imports: the most scenes to take (null = all found).
    num_scenes: PositiveInt | None = 8
    procedural: ProceduralSection = Field(default_factory=ProceduralSection)
    importer: ImporterSection = Field(default_factory=ImporterSection)
    voxel: VoxelSection = Field(default_factory=VoxelSection)
    render: RenderSection = Field(default_factory=RenderSection)
    splits: SplitSection = Field(default_factory=SplitSection)
    shards: ShardSection = Field(default_factory=ShardSection)
    # Worker processes building scenes (0 = in this process). Output bytes do not depend on it.
    num_workers: NonNegativeInt = 0
    preview_samples: NonNegativeInt = 4

    @model_validator(mode="after")
    def _source(self) -> DataStageConfig:
        if self.source != "procedural" and not self.importer.path:
            raise ValueError(f"source '{self.source}' needs importer.path (a folder or an s3:// prefix)")
        if self.source == "procedural" and self.num_scenes is None:
            raise ValueError("source 'procedural' needs num_scenes")
        v = self.voxel
        if self.source == "procedural" and v.cube_size != "fit":
            # The largest room the generator can make (L-shaped rooms get up to 1 m more) must fit the cube.
            widest = self.procedural.size_range[1] + (1.0 if "lshape" in self.procedural.room_kinds else 0.0)
            if widest + 2 * v.margin > v.cube_size or v.floor_height + 3.2 + v.margin > v.cube_size:
                raise ValueError(f"procedural rooms up to {widest:g} m wide do not fit voxel.cube_size "
                                 f"{v.cube_size:g} m with {v.margin:g} m margin: raise cube_size or lower "
                                 "procedural.size_range")
        return self
