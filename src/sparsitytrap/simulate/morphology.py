"""Colorectal-like tissue on a continuous micrometre frame: geometry, bin fields and H&E tiles.

The frame is the capture area's: x runs along array columns and y along array rows, in
micrometres, and bin (row, col) is centred at ((col + 0.5) * bin_um, (row + 0.5) * bin_um).
The tissue is a set of shapes and smooth fields of position: an irregular outline, a layering
depth (mucosa, submucosa, muscularis), glands (epithelial rings around mucus-filled lumens, with
goblet cells), lymphoid aggregates, muscle bundles, and a table of cells. One geometry therefore
gives both the compartment fields of the expression model (on the bin grid) and the H&E image,
rendered one tile at a time at any resolution.

Everything is evaluated on regular point grids (`Grid`): smooth fields on a coarse lattice,
linearly interpolated; each gland, vacuole or nucleus only on the window of grid points it covers.
"""

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

CELL_TYPES = ("epithelial", "fibroblast", "plasma", "lymphocyte", "myocyte")
EPITHELIAL, FIBROBLAST, PLASMA, LYMPHOCYTE, MYOCYTE = range(len(CELL_TYPES))

# Compartment labels of the fine label map (half-bin resolution).
LABELS = ("background", "lamina_propria", "submucosa", "aggregate", "muscle", "epithelium", "goblet", "lumen")
BACKGROUND, LAMINA, SUBMUCOSA, AGGREGATE, MUSCLE, EPITHELIUM, GOBLET, LUMEN = range(len(LABELS))

# Stain colours (RGB) as optical densities, so that overlapping stains add up (Beer-Lambert).
_RGB = {
    "background": (247, 246, 244),
    "stroma": (236, 150, 194),
    "muscle": (206, 80, 136),
    "epithelium": (214, 150, 204),
    "mucus": (206, 200, 228),
    "goblet": (222, 218, 238),
    "nucleus": (70, 44, 126),
    "lymphocyte": (50, 30, 100),
}
OD = {k: -np.log((np.array(v, float) + 1.0) / 256.0) for k, v in _RGB.items()}

_MASK = 0xFFFFFFFF


# ---------------------------------------------------------------- position-only noise
def _hash01(ix, iy, seed):
    """Uniform [0, 1) value of integer lattice points: the same at a point whatever the tile."""
    s = (int(seed) * 0x9E3779B1 + 0x632BE5AB) & _MASK
    h = (ix * 0x8DA6B343 + iy * 0xD8163841 + s) & _MASK
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _MASK
    h = ((h ^ (h >> 12)) * 0x297A2D39) & _MASK
    h ^= h >> 15
    return h * (1.0 / 2**32)


def value_noise(u, v, seed):
    """Smooth noise in [0, 1] with unit lattice spacing (scale the coordinates before calling)."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    a, b = _hash01(iu, iv, seed), _hash01(iu + 1, iv, seed)
    c, d = _hash01(iu, iv + 1, seed), _hash01(iu + 1, iv + 1, seed)
    return (a + (b - a) * fu) * (1 - fv) + (c + (d - c) * fu) * fv


def fbm(x, y, scale, seed, octaves=3):
    """Fractal noise in [0, 1] with largest feature size `scale` (um)."""
    total, norm = 0.0, 0.0
    for o in range(octaves):
        w, s = 0.5**o, scale / 2**o
        total = total + w * value_noise(x / s, y / s, seed * 31 + o)
        norm += w
    return total / norm


def streaks(x, y, theta, along, across, seed):
    """Anisotropic noise elongated along direction theta (fibres, muscle bundles)."""
    c, s = np.cos(theta), np.sin(theta)
    u, v = x * c + y * s, -x * s + y * c
    return 0.65 * value_noise(u / along, v / across, seed) + 0.35 * value_noise(2 * u / along, 2 * v / across, seed + 1)


# ---------------------------------------------------------------- point grids
def _interp_matrix(n, step):
    """Knots every `step` (and the last index) and the sparse [n, knots] linear interpolation."""
    knots = np.arange(0, n, step)
    if knots[-1] != n - 1:
        knots = np.r_[knots, n - 1]
    if len(knots) == 1:
        return knots, sp.csr_matrix(np.ones((n, 1)))
    t = np.arange(n)
    k = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2)
    f = (t - knots[k]) / (knots[k + 1] - knots[k])
    return knots, sp.csr_matrix((np.r_[1 - f, f], (np.r_[t, t], np.r_[k, k + 1])), shape=(n, len(knots)))


class Grid:
    """Points p(i, j) = origin + i * di + j * dj (um) for 0 <= i < h, 0 <= j < w."""

    def __init__(self, origin, di, dj, h, w):
        self.origin = np.asarray(origin, float)
        self.di, self.dj = np.asarray(di, float), np.asarray(dj, float)
        self.h, self.w = int(h), int(w)
        self._inv = np.linalg.inv(np.column_stack([self.di, self.dj]))  # um -> (i, j)

    def xy(self, i, j):
        """Coordinates (x, y) of (broadcast) index arrays i, j."""
        return (self.origin[0] + i * self.di[0] + j * self.dj[0], self.origin[1] + i * self.di[1] + j * self.dj[1])

    def points(self):
        return self.xy(np.arange(self.h)[:, None], np.arange(self.w)[None, :])

    def smooth(self, func, step):
        """func(x, y) on a lattice every `step` points, linearly interpolated to the whole grid."""
        ki, wi = _interp_matrix(self.h, step)
        kj, wj = _interp_matrix(self.w, step)
        coarse = func(*self.xy(ki[:, None].astype(float), kj[None, :].astype(float)))
        return np.asarray(wi @ (wj @ coarse.T).T)

    def window(self, cx, cy, radius):
        """Index slices and sub-grid coordinates of the points within `radius` um of (cx, cy)'s box."""
        ic, jc = self._inv @ (np.array([cx, cy]) - self.origin)
        hi, hj = radius * np.linalg.norm(self._inv, axis=1)
        i0, i1 = max(0, int(np.floor(ic - hi))), min(self.h, int(np.ceil(ic + hi)) + 1)
        j0, j1 = max(0, int(np.floor(jc - hj))), min(self.w, int(np.ceil(jc + hj)) + 1)
        if i0 >= i1 or j0 >= j1:
            return None
        x, y = self.xy(np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :])
        return (slice(i0, i1), slice(j0, j1)), x, y

    def bbox(self, pad=0.0):
        """(xmin, xmax, ymin, ymax) of the grid's points, widened by pad um."""
        x, y = self.xy(np.array([0, 0, self.h - 1, self.h - 1]), np.array([0, self.w - 1, 0, self.w - 1]))
        return x.min() - pad, x.max() + pad, y.min() - pad, y.max() + pad


def _near(bbox, x, y, reach):
    return np.flatnonzero((x + reach > bbox[0]) & (x - reach < bbox[1]) & (y + reach > bbox[2]) & (y - reach < bbox[3]))


# ---------------------------------------------------------------- geometry
class Tissue:
    """One patient's tissue; every field is a function of (x, y) in micrometres."""

    def __init__(self, seed, width, height, centre, radius, harmonics, axis, p):
        self.seed, self.width, self.height = int(seed), float(width), float(height)
        self.centre, self.radius, self.harmonics, self.axis = np.asarray(centre), float(radius), harmonics, axis
        self.mucosa_cut, self.muscle_cut = p["mucosa_cut"], p["muscle_cut"]
        self.mm_um = p["muscularis_mucosae_um"] / 2
        self.glands = {
            k: np.zeros((0, 3) if k.startswith("h_") else 0)
            for k in ("x", "y", "a", "b", "angle", "thick", "mucus", "h_amp", "h_phase")
        }
        self.aggregates = np.zeros((0, 3))  # x, y, radius
        self.goblets = np.zeros((0, 3))  # x, y, radius of goblet-cell mucin vacuoles
        self.cells = {k: np.zeros(0) for k in ("x", "y", "type", "r_long", "r_short", "angle")}

    # -- smooth fields (any points)
    def outline_level(self, x, y):
        """< 1 inside the tissue; an irregular, rough-edged blob."""
        dx, dy = x - self.centre[0], y - self.centre[1]
        phi = np.arctan2(dy, dx)
        shape = 1.0 + sum(a * np.cos(m * phi + p) for m, a, p in self.harmonics)
        return np.hypot(dx, dy) / (self.radius * shape) + 0.10 * (fbm(x, y, 90.0, self.seed + 1) - 0.5)

    def depth(self, x, y):
        """Tissue depth in radii along the layering axis, with wavy layer boundaries."""
        proj = ((x - self.centre[0]) * self.axis[0] + (y - self.centre[1]) * self.axis[1]) / self.radius
        return proj + 0.25 * (fbm(x, y, 260.0, self.seed + 2, octaves=2) - 0.5)

    def layer_angle(self, x, y):
        """Direction of muscle bundles and fibres: across the depth axis, slowly bending."""
        base = np.arctan2(self.axis[1], self.axis[0]) + np.pi / 2
        return base + 0.8 * (fbm(x, y, 220.0, self.seed + 3, octaves=2) - 0.5)

    def bundles(self, x, y):
        """Muscle-bundle pattern (> 0.42 inside a bundle) of the muscularis propria."""
        return streaks(x, y, self.layer_angle(x, y), 140.0, 28.0, self.seed + 4)

    def _gland_border(self, idx, alpha):
        """Radius (um) of gland idx's lumen border in its local direction alpha."""
        g = self.glands
        a, b = g["a"][idx], g["b"][idx]
        r = a * b / np.sqrt((b * np.cos(alpha)) ** 2 + (a * np.sin(alpha)) ** 2)
        for m in range(3):
            r = r * (1 + g["h_amp"][idx, m] * np.cos((m + 2) * alpha + g["h_phase"][idx, m]))
        return r

    def gland_reach(self):
        g = self.glands
        return g["a"] * (1 + np.abs(g["h_amp"]).sum(1)) + g["thick"] + 1.0

    # -- compartments on a grid
    def _glands_on(self, grid):
        """Distance (um) outward from the lumen border of the nearest gland, and that gland (-1)."""
        dist = np.full((grid.h, grid.w), np.inf)
        gid = np.full((grid.h, grid.w), -1, dtype=np.int64)
        g, reach = self.glands, self.gland_reach()
        for k in _near(grid.bbox(), g["x"], g["y"], reach):
            win = grid.window(g["x"][k], g["y"][k], reach[k])
            if win is None:
                continue
            (si, sj), x, y = win
            c, s = np.cos(g["angle"][k]), np.sin(g["angle"][k])
            dx, dy = x - g["x"][k], y - g["y"][k]
            qx, qy = dx * c + dy * s, -dx * s + dy * c
            d = np.hypot(qx, qy) - self._gland_border(k, np.arctan2(qy, qx))
            closer = d < dist[si, sj]
            dist[si, sj][closer] = d[closer]
            gid[si, sj][closer] = k
        return dist, gid

    def _discs_on(self, grid, discs):
        out = np.zeros((grid.h, grid.w), bool)
        for k in _near(grid.bbox(), discs[:, 0], discs[:, 1], discs[:, 2]):
            win = grid.window(*discs[k])
            if win is not None:
                (si, sj), x, y = win
                out[si, sj] |= (x - discs[k, 0]) ** 2 + (y - discs[k, 1]) ** 2 < discs[k, 2] ** 2
        return out

    def regions(self, grid, step):
        """Compartments on a grid; smooth fields come from a lattice every `step` points.

        Returns
        -------
        dict: `label` (uint8, see LABELS), `level` (outline level, < 1 in tissue), `depth`,
        `mucus` (lumen mucus density 0..1), `epi_height` (0 at the lumen border, 1 basal).
        """
        level = grid.smooth(self.outline_level, step)
        depth = grid.smooth(self.depth, step)
        muscle = (depth > self.muscle_cut) & (grid.smooth(self.bundles, max(1, step // 2)) > 0.42)
        muscle |= np.abs(depth - self.mucosa_cut - 0.04) * self.radius < self.mm_um
        d, gid = self._glands_on(grid)
        thick = np.where(gid >= 0, self.glands["thick"][np.maximum(gid, 0)], 0.0)
        label = np.where(depth < self.mucosa_cut, LAMINA, SUBMUCOSA).astype(np.uint8)
        label[self._discs_on(grid, self.aggregates)] = AGGREGATE
        label[muscle] = MUSCLE
        epi = (d >= 0) & (d < thick)
        label[epi] = EPITHELIUM
        label[epi & self._discs_on(grid, self.goblets)] = GOBLET
        label[d < 0] = LUMEN
        label[level >= 1.0] = BACKGROUND
        mucus = np.zeros(label.shape)
        lumen = label == LUMEN
        if lumen.any():
            noise = grid.smooth(lambda x, y: fbm(x, y, 9.0, self.seed + 5, octaves=2), max(1, step // 2))
            mucus[lumen] = self.glands["mucus"][gid[lumen]] * noise[lumen]
        return dict(
            label=label,
            level=level,
            depth=depth,
            mucus=mucus,
            epi_height=np.where(epi, d / np.maximum(thick, 1e-6), 0.0),
        )

    def label_map(self, n_rows, n_cols, bin_um, block_rows=64):
        """Compartment labels at half-bin resolution and bin-level area fractions.

        Returns
        -------
        labels
            uint8 [2 n_rows, 2 n_cols], sub-bin (i, j) centred at ((j + 0.5), (i + 0.5)) * bin_um / 2.
        fractions
            dict of float32 [n_rows, n_cols]: area fraction of every label, and `mucus`.
        """
        half = bin_um / 2
        labels = np.zeros((2 * n_rows, 2 * n_cols), np.uint8)
        mucus = np.zeros((n_rows, n_cols), np.float32)
        for r0 in range(0, n_rows, block_rows):
            r1 = min(r0 + block_rows, n_rows)
            grid = Grid(((0.5) * half, (2 * r0 + 0.5) * half), (0, half), (half, 0), 2 * (r1 - r0), 2 * n_cols)
            reg = self.regions(grid, step=8)
            labels[2 * r0 : 2 * r1] = reg["label"]
            mucus[r0:r1] = reg["mucus"].reshape(r1 - r0, 2, n_cols, 2).mean(axis=(1, 3))
        frac = {
            name: (labels == k).reshape(n_rows, 2, n_cols, 2).mean(axis=(1, 3), dtype=np.float32)
            for k, name in enumerate(LABELS)
        }
        frac["mucus"] = mucus
        return labels, frac

    def cell_counts(self, n_rows, n_cols, bin_um):
        """Number of cells of each type whose centre lies in each bin: dict of float32 [rows, cols]."""
        c = self.cells
        row = np.floor(c["y"] / bin_um).astype(np.int64)
        col = np.floor(c["x"] / bin_um).astype(np.int64)
        ok = (row >= 0) & (row < n_rows) & (col >= 0) & (col < n_cols)
        out = {}
        for t, name in enumerate(CELL_TYPES):
            sel = ok & (c["type"] == t)
            out[name] = (
                np.bincount(row[sel] * n_cols + col[sel], minlength=n_rows * n_cols)
                .reshape(n_rows, n_cols)
                .astype(np.float32)
            )
        return out

    # -- H&E
    def _nuclei_on(self, grid):
        """Nucleus opacity (0..1) on a grid, and whether the nucleus there is a lymphocyte's."""
        alpha = np.zeros((grid.h, grid.w))
        lymph = np.zeros((grid.h, grid.w), bool)
        c = self.cells
        for k in _near(grid.bbox(), c["x"], c["y"], c["r_long"]):
            win = grid.window(c["x"][k], c["y"][k], c["r_long"][k])
            if win is None:
                continue
            (si, sj), x, y = win
            co, s = np.cos(c["angle"][k]), np.sin(c["angle"][k])
            dx, dy = x - c["x"][k], y - c["y"][k]
            e = np.hypot((dx * co + dy * s) / c["r_long"][k], (-dx * s + dy * co) / c["r_short"][k])
            a = np.clip((1.0 - e) / 0.2, 0.0, 1.0)
            more = a > alpha[si, sj]
            alpha[si, sj][more] = a[more]
            lymph[si, sj][more] = c["type"][k] == LYMPHOCYTE
        return alpha, lymph

    def render(self, grid, rng):
        """H&E colours (uint8 RGB [h, w, 3]) of a grid of pixel centres."""
        reg = self.regions(grid, step=8)
        label, x, y = reg["label"], *grid.points()
        od = np.zeros(label.shape + (3,))
        st = (label == LAMINA) | (label == SUBMUCOSA) | (label == AGGREGATE)
        if st.any():
            theta = grid.smooth(
                lambda u, v: self.layer_angle(u, v) + 0.6 * (fbm(u, v, 60.0, self.seed + 6, 2) - 0.5), 8
            )
            fibre = streaks(x[st], y[st], theta[st], 22.0, 1.6, self.seed + 7)
            loose = np.where(label[st] == SUBMUCOSA, 0.75, 1.0)
            od[st] = OD["stroma"] * (loose * (0.3 + 1.0 * fibre**2))[:, None]
        mu = label == MUSCLE
        if mu.any():
            grain = grid.smooth(lambda u, v: streaks(u, v, self.layer_angle(u, v), 30.0, 2.5, self.seed + 8), 2)
            od[mu] = OD["muscle"] * (0.8 + 0.4 * grain[mu])[:, None]
        od[label == EPITHELIUM] = OD["epithelium"]
        od[label == GOBLET] = OD["goblet"]
        lu = label == LUMEN
        od[lu] = OD["mucus"] * reg["mucus"][lu, None]
        # Nuclei: haematoxylin over everything else, lymphocytes darkest, with chromatin texture.
        alpha, lymph = self._nuclei_on(grid)
        alpha *= label != BACKGROUND
        nu = alpha > 0
        if nu.any():
            dark = np.where(lymph[nu, None], OD["lymphocyte"][None, :], OD["nucleus"][None, :])
            chrom = 0.8 + 0.4 * value_noise(x[nu] / 0.9, y[nu] / 0.9, self.seed + 9)
            a = alpha[nu, None]
            od[nu] = od[nu] * (1 - a) + dark * chrom[:, None] * a
        # Section texture, a soft tissue edge, white background, grain.
        od *= (0.85 + 0.3 * grid.smooth(lambda u, v: fbm(u, v, 6.0, self.seed + 10, octaves=2), 2))[..., None]
        edge = np.clip((1.0 - reg["level"]) / 0.01, 0.0, 1.0)[..., None]
        od = od * edge + OD["background"] * (1 - edge)
        od += rng.normal(0.0, 0.015, od.shape)
        return np.clip(255.0 * np.exp(-np.maximum(od, 0.0)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- generation
def generate_tissue(n_rows, n_cols, bin_um, seed, p):
    """Draw one patient's tissue: outline, layers, glands, aggregates, goblet cells and cells.

    Parameters
    ----------
    n_rows, n_cols
        Capture area in bins; the frame spans n_cols * bin_um by n_rows * bin_um um.
    bin_um
        Bin size in um.
    seed
        Seed of the geometry (numpy Generator stream [seed, 0]).
    p
        The `morphology` parameters (see `sparsitytrap.simulate.params.DEFAULT_PARAMS`).

    Returns
    -------
    tissue
        Tissue (with its cells).
    labels, fractions
        Its `Tissue.label_map` (computed on the way, to place the cells).
    """
    rng = np.random.default_rng([seed, 0])
    width, height = n_cols * bin_um, n_rows * bin_um
    side = min(width, height)
    centre = np.array([width, height]) / 2 + rng.uniform(-0.04, 0.04, 2) * side
    m = np.arange(2, 7)
    harmonics = np.c_[
        m, rng.uniform(0.3, 1.0, m.size) * p["outline_irregularity"] / m, rng.uniform(0, 2 * np.pi, m.size)
    ]
    phi = rng.uniform(0, 2 * np.pi)
    tissue = Tissue(
        seed, width, height, centre, p["tissue_extent"] * side / 2, harmonics, np.array([np.cos(phi), np.sin(phi)]), p
    )
    tissue.glands = _place_glands(tissue, rng, p)
    tissue.aggregates = _place_aggregates(tissue, rng, p)
    epi, tissue.goblets = _gland_cells(tissue, rng)
    labels, fractions = tissue.label_map(n_rows, n_cols, bin_um)
    other = _stromal_cells(tissue, labels, bin_um / 2, rng, p)
    cells = np.concatenate([epi, other])
    tissue.cells = dict(
        x=cells[:, 0],
        y=cells[:, 1],
        type=cells[:, 2].astype(np.int8),
        r_long=cells[:, 3],
        r_short=cells[:, 4],
        angle=cells[:, 5],
    )
    return tissue, labels, fractions


def _place_glands(tissue, rng, p):
    """Glands by dart throwing in the mucosa (a few in the submucosa, as invasive tumour glands)."""
    lo, hi = p["gland_lumen_um"]
    t_lo, t_hi = p["epithelium_um"]
    n_try = int(tissue.width * tissue.height / (np.pi * (lo + t_lo) ** 2) * 8) + 10
    x = rng.uniform(0, tissue.width, n_try)
    y = rng.uniform(0, tissue.height, n_try)
    a = rng.uniform(lo, hi, n_try)
    b = a * rng.uniform(*p["gland_aspect"], n_try)
    thick = rng.uniform(t_lo, t_hi, n_try)
    amp = rng.uniform(-1, 1, (n_try, 3)) * np.array([0.12, 0.07, 0.04]) * p["gland_irregularity"]
    reach = np.sqrt(a * b) * (1 + np.abs(amp).sum(1)) + thick  # elongated glands may nearly touch
    depth = tissue.depth(x, y)
    inside = tissue.outline_level(x, y) < 0.97
    invasive = rng.random(n_try) < p["invasive_gland_fraction"]
    zone_ok = (depth < tissue.mucosa_cut - reach / tissue.radius) | (invasive & (depth < tissue.muscle_cut))
    gap = p["gland_gap_um"]
    cell = 2 * (hi * 1.25 + t_hi) + gap
    grid, kept = {}, []
    for i in np.flatnonzero(inside & zone_ok):  # greedy: glands never overlap
        key = (int(x[i] // cell), int(y[i] // cell))
        near = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in grid.get((key[0] + dx, key[1] + dy), ())]
        if all(np.hypot(x[i] - x[j], y[i] - y[j]) >= reach[i] + reach[j] + gap for j in near):
            grid.setdefault(key, []).append(i)
            kept.append(i)
    k = np.array(kept, dtype=np.int64)
    n = len(k)
    return dict(
        x=x[k],
        y=y[k],
        a=a[k],
        b=b[k],
        angle=rng.uniform(0, np.pi, n),
        thick=thick[k],
        mucus=rng.uniform(0.3, 1.0, n),
        h_amp=amp[k],
        h_phase=rng.uniform(0, 2 * np.pi, (n, 3)),
        goblet_fraction=rng.uniform(*p["goblet_fraction"], n),
    )


def _place_aggregates(tissue, rng, p):
    """Lymphoid aggregates just below the mucosa, where they sit in the colon."""
    area_mm2 = tissue.width * tissue.height / 1e6
    n_try = rng.poisson(p["aggregates_per_mm2"] * area_mm2 * 8) + 1
    x = rng.uniform(0, tissue.width, n_try)
    y = rng.uniform(0, tissue.height, n_try)
    ok = (tissue.outline_level(x, y) < 0.9) & (np.abs(tissue.depth(x, y) - tissue.mucosa_cut - 0.12) < 0.12)
    idx = np.flatnonzero(ok)[: max(1, rng.poisson(p["aggregates_per_mm2"] * area_mm2))]
    return np.c_[x[idx], y[idx], rng.uniform(*p["aggregate_radius_um"], len(idx))]


def _gland_cells(tissue, rng):
    """Epithelial nuclei along each gland's basal side; goblet vacuoles between them, apically."""
    g = tissue.glands
    cells, goblets = [np.zeros((0, 6))], [np.zeros((0, 3))]
    for i in range(len(g["x"])):
        t = g["thick"][i]
        n = max(6, int(2 * np.pi * (0.5 * (g["a"][i] + g["b"][i]) + 0.7 * t) / 5.5))
        alpha = (np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
        c, s = np.cos(g["angle"][i]), np.sin(g["angle"][i])
        for frac, shift in ((0.72, 0.0), (0.35, np.pi / n)):
            al = alpha + shift
            r = tissue._gland_border(np.full(n, i), al) + frac * t + rng.normal(0, 0.04 * t, n)
            lx, ly = r * np.cos(al), r * np.sin(al)
            px, py = g["x"][i] + lx * c - ly * s, g["y"][i] + lx * s + ly * c
            if shift == 0.0:
                cells.append(
                    np.c_[
                        px,
                        py,
                        np.full(n, EPITHELIAL),
                        rng.uniform(3.6, 4.6, n),
                        rng.uniform(1.7, 2.2, n),
                        al + g["angle"][i],
                    ]
                )
            else:
                goblets.append(np.c_[px, py, np.full(n, 0.3 * t)][rng.random(n) < g["goblet_fraction"][i]])
    return np.concatenate(cells), np.concatenate(goblets)


def _stromal_cells(tissue, labels, pitch, rng, p):
    """Fibroblasts, plasma cells, lymphocytes and myocytes: one Poisson pool thinned by compartment."""
    dens = {k: v / 1e6 for k, v in p["cells_per_mm2"].items()}  # per um^2
    per_label = np.zeros((len(LABELS), 4))  # columns: fibroblast, plasma, lymphocyte, myocyte
    per_label[LAMINA] = [dens["fibroblast_mucosa"], dens["plasma_lamina_propria"], dens["lymphocyte_scattered"], 0]
    per_label[SUBMUCOSA] = [dens["fibroblast_submucosa"], dens["plasma_elsewhere"], dens["lymphocyte_scattered"], 0]
    per_label[AGGREGATE] = [
        0.3 * dens["fibroblast_submucosa"],
        dens["plasma_elsewhere"],
        dens["lymphocyte_aggregate"],
        0,
    ]
    per_label[MUSCLE] = [0, 0, 0, dens["myocyte"]]
    cum = np.cumsum(per_label, axis=1)
    top = cum[:, -1].max()
    n = rng.poisson(top * tissue.width * tissue.height)
    x, y, u = rng.uniform(0, tissue.width, n), rng.uniform(0, tissue.height, n), rng.uniform(0, top, n)
    lab = labels[
        np.minimum((y / pitch).astype(np.int64), labels.shape[0] - 1),
        np.minimum((x / pitch).astype(np.int64), labels.shape[1] - 1),
    ]
    c = cum[lab]  # [n, 4]
    keep = u < c[:, -1]
    t = np.array([FIBROBLAST, PLASMA, LYMPHOCYTE, MYOCYTE])[(u[keep, None] < c[keep]).argmax(axis=1)]
    x, y, m = x[keep], y[keep], int(keep.sum())
    shapes = {
        FIBROBLAST: ((4.0, 6.0), (1.2, 1.8)),
        PLASMA: ((2.4, 3.0), (2.2, 2.8)),
        LYMPHOCYTE: ((2.0, 2.5), (1.8, 2.3)),
        MYOCYTE: ((5.5, 8.0), (1.1, 1.5)),
    }
    r_long, r_short = np.zeros(m), np.zeros(m)
    for ct, (lo, so) in shapes.items():
        sel = t == ct
        r_long[sel], r_short[sel] = rng.uniform(*lo, sel.sum()), rng.uniform(*so, sel.sum())
    along = tissue.layer_angle(x, y) + rng.normal(0, 0.35, m)
    angle = np.where((t == FIBROBLAST) | (t == MYOCYTE), along, rng.uniform(0, np.pi, m))
    return np.c_[x, y, t, r_long, r_short, angle]


def smooth_cells(counts, bin_um, cell_um):
    """Spread cell counts over the bins under each cell body (a Gaussian of sd cell_um / 4)."""
    return ndimage.gaussian_filter(counts, sigma=cell_um / 4 / bin_um, mode="constant").astype(np.float32)
