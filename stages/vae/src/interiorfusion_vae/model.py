"""SLAT-Interior sparse VAE: two sparse-conv encoders (geometry, material) with space-to-channel downsampling,
and a two-branch sparse upsampler with channel-to-space shortcuts and early pruning.

Shapes (N = grid resolution, 16× compression = 4 down/up-samplings, L = latent_dim):

    occupancy (+ materials) at N ──enc──▶ μ, log σ² at N/16  (geometry latent: L ch, material latent: L ch)
    z_geo at N/16 ──geometry branch──▶ N/8 ▶ N/4 ▶ N/2 ▶ N:  occupancy logits, class logits (the subdivision)
    [z_geo | z_mat] ──material branch (same subdivision)──▶ N:  8 material channels per decoded voxel

Design notes (see README "Stage 1"):
- Disentangled latents: the geometry encoder sees occupancy only and the material encoder occupancy +
  materials; the geometry branch reads only z_geo (occupancy, pruning, classes), the material branch reads both
  and the geometry branch's (detached) features at every level. So stage 2 can generate and decode geometry
  latents alone, and stage 3 material latents given the geometry; geometry outputs are bit-identical whatever the
  material latent holds.
- Early pruning: before each upsampling a linear head predicts which of the 8 children of every voxel exist.
  In training the children are the encoder's own subdivision (teacher forcing) joined by the heads' own false
  proposals (`loss.pruning_proposals`), all with BCE against the truth: free decoding's false parents are then
  seen in training, instead of compounding unseen errors level by level. At inference a child is kept when its
  logit > 0. At the last upsampling all 8 children of each kept voxel are decoded, so the occupancy logits there
  are the surface prediction and false positives reach the renderer.
- "Skip connections" in the seed's upsampler are read as the residual channel-to-space shortcuts inside each
  up-block (TRELLIS.2's SC-VAE). Encoder→decoder U-Net skips would carry information around the latent, which
  a generator cannot provide at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from interiorfusion_core.sparse import (
    SparseGroupNorm,
    SparseLinear,
    SparseTensor,
    SubMConv3d,
    channel_to_space,
    space_to_channel,
)

MATERIAL_CHANNELS = 8  # albedo RGB, metallic, roughness, normal XYZ
LEVELS = 5  # the default: N, N/2, N/4, N/8, N/16 (16× compression); one level per `channels` entry


def lookup_rows(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Row of each [b, x, y, z] in `query` within `table` (both [*, 4] int), or -1 where absent."""
    if len(table) == 0:
        return torch.full((len(query),), -1, dtype=torch.long, device=query.device)
    span = int(torch.cat([query, table]).max()) + 1

    def key(c: torch.Tensor) -> torch.Tensor:
        c = c.long()
        return ((c[:, 0] * span + c[:, 1]) * span + c[:, 2]) * span + c[:, 3]

    sorted_keys, order = torch.sort(key(table))
    q = key(query)
    pos = torch.searchsorted(sorted_keys, q).clamp(max=len(sorted_keys) - 1)
    found = sorted_keys[pos] == q
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def child_targets(parents: SparseTensor, truth_coords: torch.Tensor, truth_mask: torch.Tensor) -> torch.Tensor:
    """[M, 8] which children of each parent exist in the truth (all False for parents absent from it)."""
    rows = lookup_rows(parents.coords, truth_coords)
    out = torch.zeros(len(parents), 8, dtype=torch.bool, device=truth_mask.device)
    hit = rows >= 0
    out[hit] = truth_mask[rows[hit]]
    return out


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """Pre-activation residual block of two submanifold convs."""

    def __init__(self, channels: int, backend: str | None = None):
        super().__init__()
        self.norm1 = SparseGroupNorm(_groups(channels), channels)
        self.conv1 = SubMConv3d(channels, channels, 3, backend=backend)
        self.norm2 = SparseGroupNorm(_groups(channels), channels)
        # Start as identity: stable deep sparse stacks (zeroed by the conv itself: see SubMConv3d's zero_init).
        self.conv2 = SubMConv3d(channels, channels, 3, backend=backend, zero_init=True)
        self.act = nn.SiLU()

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv1(x.replace(self.act(self.norm1(x).feats)))
        h = self.conv2(h.replace(self.act(self.norm2(h).feats)))
        return x.replace(x.feats + h.feats)


class DownBlock(nn.Module):
    """Space-to-channel (8 children side by side) + linear, with a parameter-free shortcut that averages the
    8·C child channels in groups down to C_out. Returns the child mask (the encoder's subdivision)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.proj = nn.Linear(8 * c_in, c_out)
        self.group = 8 * c_in // c_out if (8 * c_in) % c_out == 0 else 0

    def forward(self, x: SparseTensor) -> tuple[SparseTensor, torch.Tensor]:
        parents, mask = space_to_channel(x)
        out = self.proj(parents.feats)
        if self.group:
            out = out + parents.feats.view(len(parents), -1, self.group).mean(-1)
        return parents.replace(out), mask


class UpBlock(nn.Module):
    """Linear to 8·C_out per parent, channel-to-space onto the kept children, plus a shortcut that gives every
    child its parent's features averaged in groups down to C_out."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.proj = nn.Linear(c_in, 8 * c_out)
        self.c_out = c_out
        self.group = c_in // c_out if c_in % c_out == 0 else 0

    def forward(self, x: SparseTensor, child_mask: torch.Tensor) -> SparseTensor:
        feats = self.proj(x.feats)
        if self.group:
            short = x.feats.view(len(x), self.c_out, self.group).mean(-1)
            feats = feats + short.repeat(1, 8)
        return channel_to_space(x.replace(feats), child_mask)


class SparseEncoder(nn.Module):
    def __init__(self, in_channels: int, channels: list[int], blocks: int, latent_dim: int, backend: str | None):
        super().__init__()
        # A 3³ conv stem, not a per-voxel linear: the geometry encoder's input is a constant 1 per voxel, so only a
        # neighbourhood sees shape (a linear stem gives identical features that the first GroupNorm zeroes).
        self.stem = SubMConv3d(in_channels, channels[0], 3, backend=backend)
        self.stages = nn.ModuleList(
            nn.Sequential(*[ResBlock(c, backend) for _ in range(blocks)]) for c in channels
        )
        self.downs = nn.ModuleList(DownBlock(channels[i], channels[i + 1]) for i in range(len(channels) - 1))
        self.out_norm = SparseGroupNorm(_groups(channels[-1]), channels[-1])
        self.head = nn.Linear(channels[-1], 2 * latent_dim)
        self.act = nn.SiLU()

    def forward(self, x: SparseTensor) -> tuple[SparseTensor, SparseTensor, list[SparseTensor], list[torch.Tensor]]:
        """→ (mu, logvar) at N/16, the tensors at every level N..N/16 and the child masks of each downsampling."""
        h = self.stem(x)
        levels, masks = [], []
        for i, stage in enumerate(self.stages):
            h = stage(h)
            levels.append(h)
            if i < len(self.downs):
                h, mask = self.downs[i](h)
                masks.append(mask)
        stats = self.head(self.act(self.out_norm(h).feats))
        mu, logvar = stats.chunk(2, dim=1)
        return h.replace(mu), h.replace(logvar.clamp(-30.0, 20.0)), levels, masks


@dataclass
class GeometryOutput:
    """What the geometry branch decodes from the geometry latent alone."""

    # Per upsampling (coarse → fine): the parent tensor (geometry features), its [M, 8] child logits and which
    # children were decoded.
    parents: list[SparseTensor]
    child_logits: list[torch.Tensor]
    keeps: list[torch.Tensor]
    # Finest level: every decoded candidate voxel (geometry features), its occupancy and class logits.
    voxels: SparseTensor
    occupancy_logits: torch.Tensor
    class_logits: torch.Tensor | None = None


@dataclass
class DecoderOutput:
    # Per upsampling (coarse → fine): the parent tensor and its [M, 8] child logits.
    parents: list[SparseTensor]
    child_logits: list[torch.Tensor]
    # Finest level: every decoded candidate voxel, its occupancy logit and material (albedo, metal, rough, normal).
    voxels: SparseTensor
    occupancy_logits: torch.Tensor
    material: torch.Tensor
    class_logits: torch.Tensor | None = None
    keeps: list[torch.Tensor] | None = None


def union_with_proposals(truth: torch.Tensor, logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """The true children plus the model's own proposals (logit > 0) that are not true, at most `ratio` × the
    true count (the highest logits first): training then sees the false parents free decoding produces."""
    if ratio <= 0:
        return truth
    false = (logits > 0) & ~truth
    budget = int(ratio * int(truth.sum()))
    if int(false.sum()) > budget:
        scores = torch.where(false, logits, torch.full_like(logits, -float("inf"))).reshape(-1)
        top = torch.topk(scores, budget).indices if budget else scores.new_zeros(0, dtype=torch.long)
        false = torch.zeros_like(false).reshape(-1).index_fill(0, top, True).reshape(false.shape)
    return truth | false


class GeometryDecoder(nn.Module):
    """Geometry latent → subdivision by early pruning → finest candidates with occupancy and class logits.
    Reads only the geometry latent, so a generator that produces geometry first can decode it alone."""

    def __init__(self, latent_channels: int, channels: list[int], blocks: int, backend: str | None,
                 num_classes: int):
        super().__init__()
        coarse_to_fine = list(reversed(channels))
        self.stem = nn.Linear(latent_channels, coarse_to_fine[0])
        self.stages = nn.ModuleList(
            nn.Sequential(*[ResBlock(c, backend) for _ in range(blocks)]) for c in coarse_to_fine
        )
        self.prune_heads = nn.ModuleList(SparseLinear(c, 8) for c in coarse_to_fine[:-1])
        self.ups = nn.ModuleList(
            UpBlock(coarse_to_fine[i], coarse_to_fine[i + 1]) for i in range(len(coarse_to_fine) - 1)
        )
        self.out_norm = SparseGroupNorm(_groups(channels[0]), channels[0])
        self.class_head = nn.Linear(channels[0], num_classes) if num_classes else None
        self.act = nn.SiLU()

    def forward(self, z: SparseTensor, structure: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                proposals: float = 0.0) -> GeometryOutput:
        """`structure` (coarse → fine: the encoder's parent coords and child masks) teacher-forces the
        subdivision, joined by up to `proposals` × as many of the heads' own false children; None keeps children
        whose logit > 0. The last upsampling always decodes all 8 children."""
        h = z.replace(self.stem(z.feats))
        parents, logits, keeps = [], [], []
        n_up = len(self.ups)
        for i in range(n_up):
            h = self.stages[i](h)
            child_logits = self.prune_heads[i](h).feats
            parents.append(h)
            logits.append(child_logits)
            if i == n_up - 1:
                keep = torch.ones_like(child_logits, dtype=torch.bool)
            elif structure is not None:
                keep = union_with_proposals(child_targets(h, *structure[i]), child_logits.detach(), proposals)
            else:
                keep = child_logits > 0
                # Never let a voxel lose all children at once: an empty scene is not a useful decode.
                if not bool(keep.any()):
                    keep = child_logits == child_logits.max()
            keeps.append(keep)
            h = self.ups[i](h, keep)
        h = self.stages[n_up](h)
        class_logits = None
        if self.class_head is not None:
            class_logits = self.class_head(self.act(self.out_norm(h).feats))
        # channel_to_space with an all-true mask emits children parent-major, slot-minor: logits line up.
        occupancy_logits = logits[-1].reshape(-1)
        return GeometryOutput(parents, logits, keeps, h, occupancy_logits, class_logits)


class MaterialDecoder(nn.Module):
    """Both latents → per-voxel material on the geometry branch's subdivision. At every level the geometry
    branch's features enter (detached: material losses never move the geometry decoder).

    Geometry dropout: in training, each sample loses its geometry inputs (the geometry half of the latent and the
    geometry features) with probability `geometry_dropout`, so the material latent has to carry the materials.
    Without it the branch learned to predict materials from the geometry features alone (memorising the training
    rooms by their shape) and ignored its latent: decoding a room with its true, the mean or a random material
    latent gave the same materials to 3e-4 L1, so no material generator could change them."""

    def __init__(self, latent_channels: int, channels: list[int], blocks: int, backend: str | None,
                 geometry_dropout: float = 0.0):
        super().__init__()
        self.geometry_dropout = geometry_dropout
        coarse_to_fine = list(reversed(channels))
        self.stem = nn.Linear(latent_channels, coarse_to_fine[0])
        self.lifts = nn.ModuleList(nn.Linear(c, c) for c in coarse_to_fine)
        self.stages = nn.ModuleList(
            nn.Sequential(*[ResBlock(c, backend) for _ in range(blocks)]) for c in coarse_to_fine
        )
        self.ups = nn.ModuleList(
            UpBlock(coarse_to_fine[i], coarse_to_fine[i + 1]) for i in range(len(coarse_to_fine) - 1)
        )
        self.out_norm = SparseGroupNorm(_groups(channels[0]), channels[0])
        self.head = nn.Linear(channels[0], MATERIAL_CHANNELS)
        # Logit of the dataset's mean albedo/metallic/roughness, added before the sigmoid: the head then learns
        # deviations from the data prior instead of spending thousands of steps walking its bias there.
        self.register_buffer("material_prior", torch.zeros(5))
        self.act = nn.SiLU()

    def forward(self, z: SparseTensor, geometry: GeometryOutput) -> torch.Tensor:
        keep = None  # [B] per sample: 1 keeps its geometry inputs, 0 drops them (training only)
        if self.training and self.geometry_dropout > 0:
            batch = int(z.coords[:, 0].max()) + 1 if len(z.coords) else 1
            keep = (torch.rand(batch, device=z.feats.device) >= self.geometry_dropout).to(z.feats.dtype)
        feats = z.feats
        if keep is not None:
            half = feats.shape[1] // 2
            geo_scale = keep[z.coords[:, 0].long()][:, None]
            feats = torch.cat([feats[:, :half] * geo_scale, feats[:, half:]], 1)
        h = z.replace(self.stem(feats))
        levels = [*geometry.parents, geometry.voxels]
        for i, g in enumerate(levels):
            lift = self.lifts[i](g.feats.detach())
            if keep is not None:
                lift = lift * keep[g.coords[:, 0].long()][:, None]
            h = self.stages[i](h.replace(h.feats + lift))
            if i < len(self.ups):
                h = self.ups[i](h, geometry.keeps[i])
        raw = self.head(self.act(self.out_norm(h).feats))
        pbr = torch.sigmoid(raw[:, :5] + self.material_prior)
        return torch.cat([pbr, torch.nn.functional.normalize(raw[:, 5:8], dim=1, eps=1e-6)], dim=1)


class SparseDecoder(nn.Module):
    """The two branches: geometry (geometry latent only) and material (both latents)."""

    def __init__(self, latent_dim: int, channels: list[int], blocks: int, backend: str | None, num_classes: int,
                 geometry_dropout: float = 0.0):
        super().__init__()
        self.latent_dim = latent_dim
        self.geometry = GeometryDecoder(latent_dim, channels, blocks, backend, num_classes)
        self.material = MaterialDecoder(2 * latent_dim, channels, blocks, backend, geometry_dropout)

    def forward(self, z: SparseTensor, structure: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                proposals: float = 0.0) -> DecoderOutput:
        geo = self.geometry(z.replace(z.feats[:, : self.latent_dim]), structure, proposals)
        material = self.material(z, geo)
        return DecoderOutput(geo.parents, geo.child_logits, geo.voxels, geo.occupancy_logits, material,
                             geo.class_logits, geo.keeps)


class SLATInteriorVAE(nn.Module):
    def __init__(
        self,
        latent_dim: int = 64,
        channels: list[int] | None = None,
        blocks_per_level: int = 2,
        backend: str | None = None,
        num_classes: int = 0,
        material_geometry_dropout: float = 0.0,
    ):
        super().__init__()
        channels = channels or [32, 64, 128, 256, 512]
        if len(channels) < 2:
            raise ValueError(f"channels must list at least 2 widths (one per level, finest first), got {channels}")
        self.latent_dim = latent_dim
        self.geometry_encoder = SparseEncoder(1, channels, blocks_per_level, latent_dim, backend)
        self.material_encoder = SparseEncoder(1 + MATERIAL_CHANNELS, channels, blocks_per_level, latent_dim, backend)
        self.num_classes = num_classes
        self.decoder = SparseDecoder(latent_dim, channels, blocks_per_level, backend, num_classes,
                                     material_geometry_dropout)

    @torch.no_grad()
    def set_material_prior(self, mean_material: torch.Tensor) -> None:
        """Centre the material head on the data: `mean_material` [8] (albedo, metallic, roughness, normal)."""
        p = mean_material[:5].to(self.decoder.material.material_prior).clamp(0.02, 0.98)
        self.decoder.material.material_prior.copy_(torch.log(p / (1 - p)))

    def encode(self, occupancy: SparseTensor, material: torch.Tensor) -> dict[str, object]:
        """occupancy: the surface voxels (features ignored); material [N, 8] aligned with its rows."""
        ones = occupancy.feats.new_ones(len(occupancy), 1)
        mu_g, logvar_g, levels, masks = self.geometry_encoder(occupancy.replace(ones))
        mu_m, logvar_m, _, _ = self.material_encoder(occupancy.replace(torch.cat([ones, material], 1)))
        # The subdivision, coarse → fine: parent coords at each level and which of their children exist.
        structure = [(levels[i + 1].coords, masks[i]) for i in reversed(range(len(masks)))]
        return {"mu": mu_g.replace(torch.cat([mu_g.feats, mu_m.feats], 1)),
                "logvar": logvar_g.replace(torch.cat([logvar_g.feats, logvar_m.feats], 1)),
                "structure": structure}

    @staticmethod
    def sample(mu: SparseTensor, logvar: SparseTensor, generator: torch.Generator | None = None) -> SparseTensor:
        eps = torch.randn(mu.feats.shape, generator=generator, dtype=mu.feats.dtype, device=mu.feats.device)
        return mu.replace(mu.feats + torch.exp(0.5 * logvar.feats) * eps)

    def forward(self, occupancy: SparseTensor, material: torch.Tensor, proposals: float = 0.0
                ) -> tuple[dict[str, object], DecoderOutput]:
        """Training pass: encode, sample z (μ in eval mode), decode on the true subdivision (joined by up to
        `proposals` × as many of the pruning heads' own false children)."""
        enc = self.encode(occupancy, material)
        z = self.sample(enc["mu"], enc["logvar"]) if self.training else enc["mu"]  # type: ignore[arg-type]
        return enc, self.decode(z, enc["structure"], proposals)  # type: ignore[arg-type]

    def decode(self, z: SparseTensor, structure: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               proposals: float = 0.0) -> DecoderOutput:
        """Full latent [geometry | material channels] → geometry, classes and materials."""
        if z.num_channels != 2 * self.latent_dim:
            raise ValueError(f"decode takes {2 * self.latent_dim} latent channels (geometry | material), "
                             f"got {z.num_channels}")
        return self.decoder(z, structure, proposals)

    def decode_geometry(self, z_geo: SparseTensor,
                        structure: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> GeometryOutput:
        """Geometry latent alone → occupancy and classes (what a geometry-first generator can decode)."""
        if z_geo.num_channels != self.latent_dim:
            raise ValueError(f"decode_geometry takes the {self.latent_dim} geometry channels, got {z_geo.num_channels}")
        return self.decoder.geometry(z_geo, structure)
