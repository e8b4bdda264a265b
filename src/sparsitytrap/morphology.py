"""Colorectal-like tissue on a continuous micrometre frame: geometry, bin fields and H&E tiles.

The frame is the capture area's: x runs along array columns and y along array rows, in
micrometres, and bin (row, col) is centred at ((col + 0.5) * bin_um, (row + 0.5) * bin_um).
Every compartment is a function of position (an irregular outline, glands as epithelial rings
around mucus-filled lumens, stroma with fibres, lymphoid aggregates, muscle bundles, and a table
of cells), so one geometry yields both the 2 um compartment fields of the expression model and
the H&E image, rendered tile by tile at any resolution.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

CELL_TYPES = ("epithelial", "fibroblast", "plasma", "lymphocyte", "myocyte")
EPITHELIAL, FIBROBLAST, PLASMA, LYMPHOCYTE, MYOCYTE = range(len(CELL_TYPES))

# Stain colours (RGB) turned into optical densities, so that overlapping stains add up (Beer-Lambert).
_RGB = {
    "background": (247, 246, 244),
    "stroma": (236, 158, 198),
    "muscle": (208, 84, 138),
    "epithelium": (218, 160, 206),
    "mucus": (214, 206, 232),
    "goblet": (236, 232, 242),
    "nucleus": (74, 46, 124),
    "lymphocyte": (52, 32, 98),
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


def _streaks(x, y, theta, along, across, seed):
    """Anisotropic noise elongated along direction theta (fibres, muscle bundles)."""
    c, s = np.cos(theta), np.sin(theta)
    u, v = x * c + y * s, -x * s + y * c
    return 0.65 * value_noise(u / along, v / across, seed) + 0.35 * value_noise(u / (along / 2), v / (across / 2), seed + 1)


# ---------------------------------------------------------------- geometry
@dataclass
class Tissue:
    """One patient's tissue: every field of it is a function of (x, y) in micrometres."""

    seed: int
    width: float
    height: float
    centre: np.ndarray  # (2,) um
    radius: float  # um, mean radius of the outline
    harmonics: np.ndarray  # [M, 3]: order, amplitude, phase of the outline
    axis: np.ndarray  # unit vector: tissue depth (mucosa -> submucosa -> muscle) grows along it
    mucosa_cut: float  # depth (in radii) where the mucosa ends
    muscle_cut: float  # depth where the muscularis propria starts
    mm_um: float  # half-thickness of the muscularis mucosae band
    glands: dict  # arrays: x, y, a, b, angle, thick, mucus, h_amp [n,3], h_phase [n,3]
    aggregates: np.ndarray  # [n, 3]: x, y, radius of lymphoid aggregates
    cells: dict  # arrays: x, y, type, r_long, r_short, angle
    goblets: np.ndarray  # [n, 3]: x, y, radius of goblet-cell mucin vacuoles

    def __post_init__(self):
        g = self.glands
        self._gland_reach = g["a"] * (1 + np.abs(g["h_amp"]).sum(1)) + g["thick"] + 1.0
        self._cell_tree = cKDTree(np.c_[self.cells["x"], self.cells["y"]]) if len(self.cells["x"]) else None
        self._cell_reach = float(self.cells["r_long"].max()) if len(self.cells["x"]) else 0.0
        self._goblet_tree = cKDTree(self.goblets[:, :2]) if len(self.goblets) else None
        self._goblet_reach = float(self.goblets[:, 2].max()) if len(self.goblets) else 0.0

    # -- large-scale fields
    def outline_level(self, x, y):
        """< 1 inside the tissue; an irregular, rough-edged blob."""
        dx, dy = x - self.centre[0], y - self.centre[1]
        phi = np.arctan2(dy, dx)
        shape = 1.0 + sum(a * np.cos(m * phi + p) for m, a, p in self.harmonics)
        rough = 0.10 * (fbm(x, y, 90.0, self.seed + 1) - 0.5)
        return np.hypot(dx, dy) / (self.radius * shape) + rough

    def depth(self, x, y):
        """Tissue depth in radii along the layering axis, with wavy layer boundaries."""
        proj = ((x - self.centre[0]) * self.axis[0] + (y - self.centre[1]) * self.axis[1]) / self.radius
        return proj + 0.25 * (fbm(x, y, 260.0, self.seed + 2, octaves=2) - 0.5)

    def _layer_angle(self, x, y):
        """Local direction of muscle bundles and fibres: across the depth axis, slowly bending."""
        base = np.arctan2(self.axis[1], self.axis[0]) + np.pi / 2
        return base + 1.2 * (fbm(x, y, 220.0, self.seed + 3, octaves=2) - 0.5)

    def muscle(self, x, y, depth):
        """Muscle bundles of the muscularis propria and the thin muscularis mucosae band."""
        theta = self._layer_angle(x, y)
        bundles = (depth > self.muscle_cut) & (_streaks(x, y, theta, 140.0, 28.0, self.seed + 4) > 0.42)
        band = np.abs(depth - self.mucosa_cut - 0.04) * self.radius < self.mm_um
        return bundles | band

    # -- glands
    def _gland_border(self, idx, alpha):
        """Radius (um) of gland idx's lumen border in local direction alpha."""
        g = self.glands
        a, b = g["a"][idx], g["b"][idx]
        r = a * b / np.sqrt((b * np.cos(alpha)) ** 2 + (a * np.sin(alpha)) ** 2)
        for m in range(3):
            r = r * (1 + g["h_amp"][idx, m] * np.cos((m + 2) * alpha + g["h_phase"][idx, m]))
        return r

    def glands_at(self, x, y):
        """Per point: distance (um) outward from the nearest gland's lumen border, and that gland.

        Points far from every gland get +inf and index -1.
        """
        dist = np.full(x.shape, np.inf)
        gid = np.full(x.shape, -1, dtype=np.int64)
        g = self.glands
        if not len(g["x"]) or not x.size:
            return dist, gid
        near = ((g["x"] + self._gland_reach > x.min()) & (g["x"] - self._gland_reach < x.max())
                & (g["y"] + self._gland_reach > y.min()) & (g["y"] - self._gland_reach < y.max()))
        cand = np.flatnonzero(near)
        if not cand.size:
            return dist, gid
        lists = cKDTree(np.c_[x, y]).query_ball_point(np.c_[g["x"][cand], g["y"][cand]], self._gland_reach[cand])
        lens = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
        if not lens.sum():
            return dist, gid
        pt = np.concatenate([np.asarray(v, dtype=np.int64) for v in lists if len(v)])
        gl = np.repeat(cand, lens)
        c, s = np.cos(g["angle"][gl]), np.sin(g["angle"][gl])
        dx, dy = x[pt] - g["x"][gl], y[pt] - g["y"][gl]
        qx, qy = dx * c + dy * s, -dx * s + dy * c
        d = np.hypot(qx, qy) - self._gland_border(gl, np.arctan2(qy, qx))
        # Glands do not overlap; where harmonics make them touch, the innermost one wins.
        order = np.argsort(-d, kind="stable")
        dist[pt[order]] = d[order]
        gid[pt[order]] = gl[order]
        return dist, gid

    # -- compartments
    def regions(self, x, y):
        """Compartments at points (x, y) in um.

        Returns
        -------
        dict of arrays: `level` (outline level, < 1 in tissue), `depth`, `tissue`, `lumen`,
        `epithelium`, `goblet`, `muscle`, `aggregate`, `stroma` (bool), `epi_height` (0 at the
        lumen border, 1 at the basal side), `mucus` (lumen mucus density, 0..1).
        """
        level = self.outline_level(x, y)
        tissue = level < 1.0
        depth = self.depth(x, y)
        d, gid = self.glands_at(x, y)
        thick = np.where(gid >= 0, self.glands["thick"][np.maximum(gid, 0)], 0.0)
        lumen = tissue & (d < 0)
        epi = tissue & (d >= 0) & (d < thick)
        goblet = np.zeros(x.shape, bool)
        goblet[epi] = self._inside_goblet(x[epi], y[epi])
        muscle = tissue & ~lumen & ~epi & self.muscle(x, y, depth)
        agg = np.zeros(x.shape, bool)
        for ax, ay, ar in self.aggregates:
            agg |= (x - ax) ** 2 + (y - ay) ** 2 < ar**2
        agg &= tissue & ~lumen & ~epi & ~muscle
        stroma = tissue & ~lumen & ~epi & ~muscle
        mucus = np.zeros(x.shape)
        if lumen.any():
            mucus[lumen] = self.glands["mucus"][gid[lumen]] * fbm(x[lumen], y[lumen], 9.0, self.seed + 5, octaves=2)
        epi_height = np.where(epi, d / np.maximum(thick, 1e-6), 0.0)
        return dict(level=level, depth=depth, tissue=tissue, lumen=lumen, epithelium=epi, goblet=goblet,
                    muscle=muscle, aggregate=agg, stroma=stroma, epi_height=epi_height, mucus=mucus)

    def _inside_goblet(self, x, y):
        if self._goblet_tree is None:
            return np.zeros(x.shape, bool)
        dist, idx = self._goblet_tree.query(np.c_[x, y], distance_upper_bound=self._goblet_reach)
        found = np.isfinite(dist)
        out = np.zeros(x.shape, bool)
        out[found] = dist[found] < self.goblets[idx[found], 2]
        return out

    def nuclei_at(self, x, y):
        """Nucleus opacity (0..1) and the type of the nearest cell (-1 where none is near) at points."""
        alpha = np.zeros(x.shape)
        ctype = np.full(x.shape, -1, dtype=np.int64)
        if self._cell_tree is None:
            return alpha, ctype
        dist, idx = self._cell_tree.query(np.c_[x, y], distance_upper_bound=self._cell_reach)
        hit = np.flatnonzero(np.isfinite(dist))
        i = idx[hit]
        c = self.cells
        co, si = np.cos(c["angle"][i]), np.sin(c["angle"][i])
        dx, dy = x[hit] - c["x"][i], y[hit] - c["y"][i]
        e = np.hypot((dx * co + dy * si) / c["r_long"][i], (-dx * si + dy * co) / c["r_short"][i])
        alpha[hit] = np.clip((1.0 - e) / 0.2, 0.0, 1.0)
        ctype[hit] = c["type"][i]
        return alpha, ctype

    # -- outputs
    def bin_fields(self, n_rows, n_cols, bin_um, supersample=2, block_rows=64):
        """Compartment area fractions and cell counts on the bin grid.

        Returns
        -------
        dict of float32 [n_rows, n_cols]: area fractions `tissue`, `lumen`, `mucus`,
        `epithelium`, `goblet`, `muscle`, `stroma`; and per cell type the number of cells whose
        centre lies in the bin (`cells_<type>`).
        """
        names = ("tissue", "lumen", "mucus", "epithelium", "goblet", "muscle", "stroma")
        out = {k: np.zeros((n_rows, n_cols), np.float32) for k in names}
        sub = (np.arange(supersample) + 0.5) / supersample
        for r0 in range(0, n_rows, block_rows):
            r1 = min(r0 + block_rows, n_rows)
            yy = (np.arange(r0, r1)[:, None] + sub[None, :]).ravel() * bin_um
            xx = (np.arange(n_cols)[:, None] + sub[None, :]).ravel() * bin_um
            y, x = np.meshgrid(yy, xx, indexing="ij")
            reg = self.regions(x.ravel(), y.ravel())
            reg["goblet"] = reg["goblet"] & reg["epithelium"]
            reg["epithelium"] = reg["epithelium"] & ~reg["goblet"]
            for k in names:
                v = reg[k].astype(np.float32).reshape(r1 - r0, supersample, n_cols, supersample)
                out[k][r0:r1] = v.mean(axis=(1, 3))
        c = self.cells
        row = np.floor(c["y"] / bin_um).astype(np.int64)
        col = np.floor(c["x"] / bin_um).astype(np.int64)
        ok = (row >= 0) & (row < n_rows) & (col >= 0) & (col < n_cols)
        for t, name in enumerate(CELL_TYPES):
            sel = ok & (c["type"] == t)
            flat = np.bincount(row[sel] * n_cols + col[sel], minlength=n_rows * n_cols)
            out[f"cells_{name}"] = flat.reshape(n_rows, n_cols).astype(np.float32)
        return out

    def render(self, x, y, rng):
        """H&E colour (uint8 RGB, shape [n, 3]) at points (x, y) in um."""
        reg = self.regions(x, y)
        od = np.zeros(x.shape + (3,))
        st = reg["stroma"]
        if st.any():
            theta = self._layer_angle(x[st], y[st]) + 0.9 * (fbm(x[st], y[st], 60.0, self.seed + 6, 2) - 0.5)
            fibre = _streaks(x[st], y[st], theta, 22.0, 1.6, self.seed + 7)
            loose = np.where(reg["depth"][st] > self.mucosa_cut, 0.75, 1.0)
            od[st] = OD["stroma"] * (loose * (0.25 + 1.1 * fibre**2))[:, None]
        mu = reg["muscle"]
        if mu.any():
            grain = _streaks(x[mu], y[mu], self._layer_angle(x[mu], y[mu]), 30.0, 2.5, self.seed + 8)
            od[mu] = OD["muscle"] * (0.8 + 0.4 * grain)[:, None]
        od[reg["epithelium"]] = OD["epithelium"]
        od[reg["goblet"]] = OD["goblet"]
        lu = reg["lumen"]
        od[lu] = OD["mucus"] * reg["mucus"][lu, None]
        # Nuclei: haematoxylin over everything, lymphocytes the darkest; chromatin texture.
        alpha, ctype = self.nuclei_at(x, y)
        alpha *= reg["tissue"]
        nu = alpha > 0
        if nu.any():
            dark = np.where(ctype[nu, None] == LYMPHOCYTE, OD["lymphocyte"][None, :], OD["nucleus"][None, :])
            chrom = 0.8 + 0.4 * value_noise(x[nu] / 0.9, y[nu] / 0.9, self.seed + 9)
            a = alpha[nu, None]
            od[nu] = od[nu] * (1 - a) + dark * chrom[:, None] * a
        # Slide texture, a soft tissue edge, white background, grain.
        od *= (0.85 + 0.3 * fbm(x, y, 6.0, self.seed + 10, octaves=2))[:, None]
        edge = np.clip((1.0 - reg["level"]) / 0.01, 0.0, 1.0)[:, None]
        od = od * edge + OD["background"] * (1 - edge)
        od += rng.normal(0.0, 0.015, od.shape)
        return np.clip(255.0 * np.exp(-np.maximum(od, 0.0)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- generation
def _place_glands(tissue, rng, p):
    """Glands by dart throwing in the mucosa (a few in the submucosa, as invasive tumour glands)."""
    lo, hi = p["gland_lumen_um"]
    t_lo, t_hi = p["epithelium_um"]
    area = tissue.width * tissue.height
    n_try = int(area / (np.pi * ((lo + hi) / 2 + t_hi) ** 2) * 6) + 10
    x = rng.uniform(0, tissue.width, n_try)
    y = rng.uniform(0, tissue.height, n_try)
    a = rng.uniform(lo, hi, n_try)
    b = a * rng.uniform(0.55, 1.0, n_try)
    thick = rng.uniform(t_lo, t_hi, n_try)
    amp = rng.uniform(-1, 1, (n_try, 3)) * np.array([0.12, 0.07, 0.04]) * p["gland_irregularity"]
    reach = a * (1 + np.abs(amp).sum(1)) + thick
    depth = tissue.depth(x, y)
    inside = tissue.outline_level(x, y) < 0.97
    invasive = rng.random(n_try) < p["invasive_gland_fraction"]
    zone_ok = (depth < tissue.mucosa_cut - 0.02 - reach / tissue.radius) | (invasive & (depth < tissue.muscle_cut))
    keep_pool = np.flatnonzero(inside & zone_ok)
    gap = p["gland_gap_um"]
    cell = 2 * (hi * 1.25 + t_hi) + gap
    grid = {}
    kept = []
    for i in keep_pool:  # greedy, so glands never overlap
        key = (int(x[i] // cell), int(y[i] // cell))
        ok = True
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for j in grid.get((key[0] + dx, key[1] + dy), ()):
                    if np.hypot(x[i] - x[j], y[i] - y[j]) < reach[i] + reach[j] + gap:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault(key, []).append(i)
            kept.append(i)
    k = np.array(kept, dtype=np.int64)
    n = len(k)
    return dict(x=x[k], y=y[k], a=a[k], b=b[k], angle=rng.uniform(0, np.pi, n), thick=thick[k],
                mucus=rng.uniform(0.3, 1.0, n), h_amp=amp[k], h_phase=rng.uniform(0, 2 * np.pi, (n, 3)),
                goblet_fraction=rng.uniform(*p["goblet_fraction"], n))


def _gland_cells(tissue, rng):
    """Epithelial nuclei along each gland's basal side; goblet vacuoles between them, apically."""
    g = tissue.glands
    cells, goblets = [], []
    for i in range(len(g["x"])):
        t = g["thick"][i]
        mean_r = 0.5 * (g["a"][i] + g["b"][i]) + 0.7 * t
        n = max(6, int(2 * np.pi * mean_r / 5.5))
        alpha = (np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
        for frac, kind in ((0.72, "nucleus"), (0.35, "goblet")):
            al = alpha + (np.pi / n if kind == "goblet" else 0.0)
            r = tissue._gland_border(np.full(n, i), al) + frac * t + rng.normal(0, 0.04 * t, n)
            c, s = np.cos(g["angle"][i]), np.sin(g["angle"][i])
            lx, ly = r * np.cos(al), r * np.sin(al)
            px, py = g["x"][i] + lx * c - ly * s, g["y"][i] + lx * s + ly * c
            if kind == "nucleus":
                cells.append(np.c_[px, py, np.full(n, EPITHELIAL), rng.uniform(3.6, 4.6, n),
                                   rng.uniform(1.7, 2.2, n), al + g["angle"][i]])
            else:
                sel = rng.random(n) < g["goblet_fraction"][i]
                goblets.append(np.c_[px, py, np.full(n, 0.3 * t)][sel])
    cells = np.concatenate(cells) if cells else np.zeros((0, 6))
    goblets = np.concatenate(goblets) if goblets else np.zeros((0, 3))
    return cells, goblets


def _stromal_cells(tissue, rng, p, chunk=200_000):
    """Fibroblasts, plasma cells, lymphocytes and myocytes by thinning one Poisson pool of points."""
    dens = {k: v / 1e6 for k, v in p["cells_per_mm2"].items()}  # per um^2
    top = sum(dens.values()) + dens["lymphocyte_aggregate"]
    n = rng.poisson(top * tissue.width * tissue.height)
    x = rng.uniform(0, tissue.width, n)
    y = rng.uniform(0, tissue.height, n)
    u = rng.uniform(0, top, n)
    out = []
    for s in range(0, n, chunk):
        xs, ys, us = x[s:s + chunk], y[s:s + chunk], u[s:s + chunk]
        reg = tissue.regions(xs, ys)
        mucosa = reg["depth"] < tissue.mucosa_cut
        st, mu, agg = reg["stroma"], reg["muscle"], reg["aggregate"]
        # Density of each type at each point, stacked in a fixed order and thinned against u.
        d = np.stack([
            st * np.where(mucosa, dens["fibroblast_mucosa"], dens["fibroblast_submucosa"]),
            st * (mucosa * dens["plasma_lamina_propria"] + dens["plasma_elsewhere"]),
            st * (dens["lymphocyte_scattered"] + agg * dens["lymphocyte_aggregate"]),
            mu * dens["myocyte"],
        ])
        cum = np.cumsum(d, axis=0)
        pick = (us[None, :] < cum).argmax(axis=0)
        keep = us < cum[-1]
        types = np.array([FIBROBLAST, PLASMA, LYMPHOCYTE, MYOCYTE])[pick[keep]]
        out.append(np.c_[xs[keep], ys[keep], types])
    pts = np.concatenate(out) if out else np.zeros((0, 3))
    t = pts[:, 2].astype(int)
    m = len(pts)
    long_ = np.select([t == FIBROBLAST, t == PLASMA, t == LYMPHOCYTE, t == MYOCYTE],
                      [rng.uniform(4.0, 6.0, m), rng.uniform(2.4, 3.0, m), rng.uniform(2.0, 2.5, m),
                       rng.uniform(5.5, 8.0, m)])
    short = np.select([t == FIBROBLAST, t == PLASMA, t == LYMPHOCYTE, t == MYOCYTE],
                      [rng.uniform(1.2, 1.8, m), long_ * rng.uniform(0.8, 1.0, m), long_ * rng.uniform(0.85, 1.0, m),
                       rng.uniform(1.1, 1.5, m)])
    along = tissue._layer_angle(pts[:, 0], pts[:, 1]) + rng.normal(0, 0.35, m)
    angle = np.where((t == FIBROBLAST) | (t == MYOCYTE), along, rng.uniform(0, np.pi, m))
    return np.c_[pts[:, :2], t, long_, short, angle]


def generate_tissue(n_rows, n_cols, bin_um, seed, p):
    """Draw one patient's tissue geometry and cells.

    Parameters
    ----------
    n_rows, n_cols
        Capture area in 2 um bins; the frame spans n_cols * bin_um by n_rows * bin_um um.
    bin_um
        Bin size in um.
    seed
        Seed of the geometry (numpy Generator stream [seed, 0]).
    p
        The `morphology` parameters (see `sparsitytrap.simulate.DEFAULT_PARAMS`).

    Returns
    -------
    Tissue
    """
    rng = np.random.default_rng([seed, 0])
    width, height = n_cols * bin_um, n_rows * bin_um
    side = min(width, height)
    centre = np.array([width, height]) / 2 + rng.uniform(-0.04, 0.04, 2) * side
    m = np.arange(2, 7)
    harmonics = np.c_[m, rng.uniform(0.3, 1.0, m.size) * p["outline_irregularity"] / m, rng.uniform(0, 2 * np.pi, m.size)]
    phi = rng.uniform(0, 2 * np.pi)
    tissue = Tissue(seed=int(seed), width=width, height=height, centre=centre,
                    radius=p["tissue_extent"] * side / 2, harmonics=harmonics,
                    axis=np.array([np.cos(phi), np.sin(phi)]), mucosa_cut=p["mucosa_cut"],
                    muscle_cut=p["muscle_cut"], mm_um=p["muscularis_mucosae_um"] / 2,
                    glands=dict(x=np.zeros(0), y=np.zeros(0), a=np.zeros(0), b=np.zeros(0), angle=np.zeros(0),
                                thick=np.zeros(0), mucus=np.zeros(0), h_amp=np.zeros((0, 3)),
                                h_phase=np.zeros((0, 3))),
                    aggregates=np.zeros((0, 3)), cells=_empty_cells(), goblets=np.zeros((0, 3)))
    glands = _place_glands(tissue, rng, p)
    aggregates = _place_aggregates(tissue, rng, p)
    tissue = _with(tissue, glands=glands, aggregates=aggregates)
    epi, goblets = _gland_cells(tissue, rng)
    tissue = _with(tissue, goblets=goblets)
    stromal = _stromal_cells(tissue, rng, p)
    allc = np.concatenate([epi, stromal])
    cells = dict(x=allc[:, 0], y=allc[:, 1], type=allc[:, 2].astype(np.int8), r_long=allc[:, 3],
                 r_short=allc[:, 4], angle=allc[:, 5])
    return _with(tissue, cells=cells)


def _empty_cells():
    z = np.zeros(0)
    return dict(x=z, y=z, type=np.zeros(0, np.int8), r_long=z, r_short=z, angle=z)


def _with(tissue, **changes):
    fields = {k: getattr(tissue, k) for k in tissue.__dataclass_fields__}
    return Tissue(**{**fields, **changes})


def _place_aggregates(tissue, rng, p):
    """Lymphoid aggregates just below the mucosa, where they sit in the colon."""
    area_mm2 = tissue.width * tissue.height / 1e6
    n_try = rng.poisson(p["aggregates_per_mm2"] * area_mm2 * 8) + 1
    x = rng.uniform(0, tissue.width, n_try)
    y = rng.uniform(0, tissue.height, n_try)
    d = tissue.depth(x, y)
    ok = (tissue.outline_level(x, y) < 0.9) & (np.abs(d - tissue.mucosa_cut - 0.12) < 0.12)
    n = min(int(ok.sum()), rng.poisson(p["aggregates_per_mm2"] * area_mm2))
    idx = np.flatnonzero(ok)[:n]
    r = rng.uniform(*p["aggregate_radius_um"], len(idx))
    return np.c_[x[idx], y[idx], r]


def smooth_cells(counts, bin_um, cell_um):
    """Spread cell counts over the bins under each cell body (a Gaussian of sd cell_um / 2)."""
    return ndimage.gaussian_filter(counts, sigma=cell_um / 2 / bin_um, mode="constant").astype(np.float32)
