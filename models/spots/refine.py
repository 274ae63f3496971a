"""Continuous refinement of orientations against the simulated spots, vectorised over a page.

The score of an orientation is the correlation of its kinematical spots (positions and
intensities from diffraction.py, the same model as the templates) with the pattern's polar
image (the matcher's output: gamma 0.5, each radius' mean removed, unit norm), read by
bilinear interpolation: sum_s w_s P(r_s, theta_s) / sqrt(sum_s w_s^2), w = I^0.5. A pattern
search in the lab frame (tilts about x and y, in-plane turn about z) halves its step from 2
degrees to 1/8 degree, so the answer leaves the library's 2-degree grid. Every candidate of
every pattern of a page moves at once (numpy arrays over candidates x spots); only the
reflections near the Ewald sphere (|s| < ``NEAR_SPHERE``) where the orientation stands at each step
size are followed.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from .diffraction import Reflections, axis_rotations, reflections, spot_intensities
from .templates import EXCITATION_WIDTH, INTENSITY_POWER, PolarGrid

NEAR_SPHERE = 0.06  # 1/angstrom: reflections followed (a 2-degree move shifts |g| 1.2/A by 0.04)
# From 2 degrees: 1.5 points more within 3 deg than from 1 degree (400 moderate patterns, seeds 7
# and 11: 83.8->85.3%, 86.3->87.8%), 1.2x the refinement time; a 1/16 deg step more changed no figure.
STEPS_DEG = (2.0, 1.0, 0.5, 0.25, 0.125)
MOVES_PER_STEP = 2
POOL_SPHERE = 0.2  # 1/angstrom: |g| 1.9/A moves 0.2/A in 6 degrees
ZONE_INDEX = 2
# The refinement follows the reflections with |F|^2 at least this share of the strongest: weaker
# ones weigh under 3% of the strongest spot in the score (|I|^0.5) and are below the noise of any
# pattern, but were a quarter of cementite's 4262 (ferrite and austenite have none): 1200 moderate
# patterns, seeds 7 and 11, the same figures (93.75% / 95.17% within 3 deg mod 180) without them.
REFLECTION_FLOOR = 1e-3
# The coarse steps (``refine(coarse=True)``: every start at 2 and 1 degrees, where the search only
# has to reach the right basin) follow only the reflections above this share: 44% of cementite's
# (ferrite and austenite keep all). The refinement's CPU 2.29 -> 1.75 s of 1200 patterns; the same
# figures within 3 deg (mod 180) on moderate seeds 7, 11, 8 and clean and hard seed 7, one
# pattern of seed 7 another phase (99.75 -> 99.67%). 3e-2 (ferrite and austenite too): 1.53 s,
# hard seed 7 right phase 99.33 -> 99.25%.
COARSE_FLOOR = 1e-2


def strong_reflections(refl: Reflections, floor: float) -> Reflections:
    """The reflections whose |F|^2 is at least ``floor`` times the strongest's."""
    keep = refl.f2 >= floor * refl.f2.max()
    return refl if keep.all() else Reflections(refl.hkl[keep], refl.g[keep], refl.f2[keep])


def zone_axes(refl, max_index: int) -> np.ndarray:
    """The phase's zone axes [uvw] with |u|, |v|, |w| <= ``max_index`` as (Z, 3) unit vectors in
    the crystal's Cartesian frame (one of each +-pair); the direct basis from the reflections'
    reciprocal one (a_i . b_j = delta_ij)."""
    reciprocal = np.linalg.lstsq(refl.hkl, refl.g, rcond=None)[0]  # rows b1, b2, b3
    direct = np.linalg.inv(reciprocal.T)  # rows a1, a2, a3
    r = np.arange(-max_index, max_index + 1)
    uvw = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    uvw = uvw[np.gcd.reduce(np.abs(uvw), axis=1) == 1]
    first = uvw[np.arange(len(uvw)), (uvw != 0).argmax(1)]
    uvw = uvw[first > 0]
    axes = uvw @ direct
    return axes / np.linalg.norm(axes, axis=1, keepdims=True)


class SpotRefiner:
    """Refines (n, 3, 3) orientation matrices of one phase against polar images."""

    def __init__(self, phase, setup: dict, grid: PolarGrid, wavelength_a: float):
        self.setup, self.grid, self.wavelength = setup, grid, wavelength_a
        self.refl = strong_reflections(reflections(phase, (grid.r_max + 3) * setup["calibration"]), REFLECTION_FLOOR)
        self.coarse_refl = strong_reflections(self.refl, COARSE_FLOOR)
        self.angles = grid.angles
        self.zone_axes = zone_axes(self.refl, ZONE_INDEX)


    def _subset(self, matrices: np.ndarray, pool=None, near_sphere: float = NEAR_SPHERE):
        """The reflections within ``near_sphere`` of the Ewald sphere and on the polar grid, per
        orientation: (n, S, 3) g and (n, S) |F|^2 (0 where padding), chosen among all of the
        phase's reflections or, given ``pool`` (such a pair), among each orientation's own (compiled,
        _near_pool: the numpy selection was a third of the refinement's time)."""
        if pool is not None:
            return _near_pool(np.ascontiguousarray(pool[0], np.float64), np.ascontiguousarray(pool[1], np.float64),
                              np.ascontiguousarray(matrices, np.float64), 1.0 / self.wavelength, near_sphere,
                              float(self.setup["calibration"]), self.grid.r_min - 1.0, self.grid.r_max + 1.0)
        return _near_all(self.refl.g, self.refl.f2, np.ascontiguousarray(matrices, np.float64),
                         1.0 / self.wavelength, near_sphere, float(self.setup["calibration"]),
                         self.grid.r_min - 1.0, self.grid.r_max + 1.0)

    def score(self, matrices, g, f2, polar, rows) -> np.ndarray:
        """(n, 3, 3) matrices, their (n, S, 3) reflections and |F|^2, (B, R, A) polar images and
        the (n,) row of each candidate's image -> (n,) scores."""
        return self.score_trials(np.asarray(matrices)[:, None], g, f2, polar, rows)[:, 0]

    def score_trials(self, matrices, g, f2, polar, rows) -> np.ndarray:
        """(n, m, 3, 3) trial matrices, each row's (n, S, 3) reflections and |F|^2, polar images and
        (n,) rows -> (n, m) scores: ``score_reference`` in one compiled pass (no (n*m, S)
        temporaries, the reflections not repeated for each trial), 4-5x faster."""
        polar = np.ascontiguousarray(polar)
        return _score_trials(np.ascontiguousarray(matrices, np.float64), np.ascontiguousarray(g, np.float64),
                             np.ascontiguousarray(f2, np.float64), polar.reshape(len(polar), -1),
                             np.ascontiguousarray(rows, np.int64), polar.shape[1], self.angles,
                             float(self.setup["calibration"]), float(self.grid.r_min), float(self.wavelength),
                             float(self.setup["precession"]), EXCITATION_WIDTH, INTENSITY_POWER)

    def score_reference(self, matrices, g, f2, polar, rows) -> np.ndarray:
        """``score`` in numpy (the definition; the tests hold the compiled one to it)."""
        w, value = self.spot_reads(matrices, g, f2, polar, rows)
        return (w * value).sum(1) / np.maximum(np.sqrt((w**2).sum(1)), 1e-12)

    def spot_reads(self, matrices, g, f2, polar, rows) -> tuple[np.ndarray, np.ndarray]:
        """Each predicted spot's weight |I|^INTENSITY_POWER (0 off the polar grid) and the polar
        image read there bilinearly: (n, S) and (n, S), the same shapes as ``f2``."""
        lab = np.einsum("nsi,nij->nsj", g, matrices, optimize=True)
        inten = spot_intensities(lab, f2, wavelength_a=self.wavelength, precession_deg=self.setup["precession"],
                                 excitation_width=EXCITATION_WIDTH)
        w = np.abs(inten) ** INTENSITY_POWER
        cal = self.setup["calibration"]
        r = np.hypot(lab[..., 0], lab[..., 1]) / cal - self.grid.r_min
        a = polar_angle(lab[..., 1], lab[..., 0]) * (self.angles / (2 * np.pi))
        n_r = polar.shape[1]
        inside = (r >= 0) & (r <= n_r - 1)
        w = np.where(inside, w, 0.0)
        r = np.clip(r, 0, n_r - 1.001)
        r0 = r.astype(np.int64)
        a0 = a.astype(np.int64) % self.angles
        fr, fa = r - r0, a - np.floor(a)
        a1 = (a0 + 1) % self.angles
        base = rows[:, None] * (n_r * self.angles)
        flat = polar.reshape(-1)
        value = ((1 - fr) * (1 - fa) * flat[base + r0 * self.angles + a0]
                 + (1 - fr) * fa * flat[base + r0 * self.angles + a1]
                 + fr * (1 - fa) * flat[base + (r0 + 1) * self.angles + a0]
                 + fr * fa * flat[base + (r0 + 1) * self.angles + a1])
        return w, value

    def explained(self, matrices: np.ndarray, polar: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(n,) fraction of each pattern's polar-image energy within about 1.5 pixels of the
        orientation's predicted spots: near 1 where the answer accounts for every spot seen,
        low where the pattern has spots it does not predict."""
        g, f2 = self._subset(matrices)
        lab = np.einsum("nsi,nij->nsj", g, matrices, optimize=True)
        inten = spot_intensities(lab, f2, wavelength_a=self.wavelength, precession_deg=self.setup["precession"],
                                 excitation_width=EXCITATION_WIDTH)
        n, n_r, n_a = len(matrices), polar.shape[1], self.angles
        r = np.hypot(lab[..., 0], lab[..., 1]) / self.setup["calibration"] - self.grid.r_min
        a = (np.arctan2(lab[..., 1], lab[..., 0]) % (2 * np.pi)) * (n_a / (2 * np.pi))
        seen = (inten > 1e-3 * np.maximum(inten.max(1, keepdims=True), 1e-12)) & (r > -1.5) & (r < n_r + 0.5)
        spot, idx = np.nonzero(seen)  # in the orientations' order
        rr, aa = r[spot, idx], a[spot, idx]
        half = np.ceil(1.5 / np.maximum(rr + self.grid.r_min, 1.0) * n_a / (2 * np.pi)).astype(np.int64)
        return _energy_near_spots(np.ascontiguousarray(polar), np.ascontiguousarray(rows, np.int64), n, spot,
                                  np.rint(rr).astype(np.int64), np.rint(aa).astype(np.int64), half)

    def refine(self, matrices: np.ndarray, polar: np.ndarray, rows: np.ndarray, steps=STEPS_DEG, coarse: bool = False):
        """(n, 3, 3) start orientations, polar images, (n,) image rows -> refined (n, 3, 3), scores (n,).
        ``steps``: the pattern search's step sizes in degrees (the indexer runs the coarse ones on
        every start and the fine ones on the best starts only); ``coarse``: follow only the
        reflections above ``COARSE_FLOOR`` (the coarse steps). ``refine_reference`` in one
        compiled call that releases the GIL (_refine_compiled): the same answers; the two pages
        that ``liveindex index`` runs at once in one process then refine on both cores, where the
        numpy steps between many short compiled calls held the GIL in turn."""
        polar = np.ascontiguousarray(polar)
        refl = self.coarse_refl if coarse else self.refl
        return _refine_compiled(refl.g, refl.f2, np.array(matrices, np.float64), self._moves(tuple(steps)),
                                polar.reshape(len(polar), -1), np.ascontiguousarray(rows, np.int64), polar.shape[1],
                                self.angles, float(self.setup["calibration"]), float(self.grid.r_min),
                                float(self.grid.r_max), float(self.wavelength), float(self.setup["precession"]),
                                EXCITATION_WIDTH, INTENSITY_POWER, POOL_SPHERE, NEAR_SPHERE, MOVES_PER_STEP)

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def _moves(steps) -> np.ndarray:
        """(len(steps), 6, 3, 3): each step's turns by +-step about lab x, y and z, in
        ``refine_reference``'s order (made once for each ``steps``, read-only)."""
        moves = [np.concatenate([axis_rotations(axis, np.array([sign * np.deg2rad(step)]))
                                 for axis in range(3) for sign in (1, -1)]) for step in steps]
        out = np.stack(moves) if moves else np.zeros((0, 6, 3, 3))
        out.flags.writeable = False
        return out

    def refine_reference(self, matrices: np.ndarray, polar: np.ndarray, rows: np.ndarray, steps=STEPS_DEG):
        """``refine`` in numpy over the page (the definition; the tests hold the compiled one to it)."""
        current = np.array(matrices, np.float64)
        n = len(current)
        # The reflections followed are chosen again at each step size, where the orientation
        # is now: chosen once at the start, an orientation that moved did not see the spots it
        # now excites (nor the truth's spots beyond NEAR_SPHERE of a start 2-3 deg off). They
        # are chosen among a pool within POOL_SPHERE at the start (not all of the phase's).
        pool = self._subset(current, near_sphere=POOL_SPHERE)
        for step in steps:
            g, f2 = self._subset(current, pool)
            best = self.score(current, g, f2, polar, rows)
            delta = np.deg2rad(step)
            moves = np.concatenate([axis_rotations(axis, np.array([sign * delta]))
                                    for axis in range(3) for sign in (1, -1)])  # (6, 3, 3)
            # Only the candidates that moved try again: the others would score the same trials.
            active = np.arange(n)
            for _ in range(MOVES_PER_STEP):
                m = len(active)
                trial = np.einsum("nij,mjk->nmik", current[active], moves)  # (m, 6, 3, 3)
                scores = self.score_trials(trial, g[active], f2[active], polar, rows[active])
                pick = scores.argmax(1)
                top = scores[np.arange(m), pick]
                better = top > best[active]
                if not better.any():
                    break
                moved = active[better]
                current[moved] = trial.reshape(m, 6, 3, 3)[np.flatnonzero(better), pick[better]]
                best[moved] = top[better]
                active = moved
        g, f2 = self._subset(current, pool)
        return current, self.score(current, g, f2, polar, rows)


# atan(t) on [0, 1], an odd minimax polynomial: within 1.7e-6 rad of atan2 (1e-4 of a polar bin).
ATAN_COEFFICIENTS = (0.99997726, -0.33262347, 0.19354346, -0.11643287, 0.05265332, -0.01172120)


def polar_angle(y, x):
    """The angle of (x, y) in [0, 2 pi), from ATAN_COEFFICIENTS (numpy; ``_polar_angle`` compiled,
    the same arithmetic). The refinement's score reads the polar image at every spot of every
    trial: math.atan2 was about a third of that time, the polynomial 5x faster."""
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    ax, ay = np.abs(x), np.abs(y)
    big, small = np.maximum(ax, ay), np.minimum(ax, ay)
    t = np.where(big > 0, small / np.where(big > 0, big, 1.0), 0.0)
    c0, c1, c2, c3, c4, c5 = ATAN_COEFFICIENTS
    u = t * t
    r = t * (c0 + u * (c1 + u * (c2 + u * (c3 + u * (c4 + u * c5)))))
    r = np.where(ay > ax, 0.5 * np.pi - r, r)
    r = np.where(x < 0, np.pi - r, r)
    return np.where(y < 0, 2 * np.pi - r, r)


@numba.njit(cache=True, nogil=True, fastmath=False)
def _polar_angle(y, x):
    """``polar_angle`` of one point, compiled: the same arithmetic, bit for bit (without fastmath;
    with it the refinement was no faster, 400 moderate patterns)."""
    ax, ay = abs(x), abs(y)
    big, small = max(ax, ay), min(ax, ay)
    t = small / big if big > 0 else 0.0
    c0, c1, c2, c3, c4, c5 = ATAN_COEFFICIENTS
    u = t * t
    r = t * (c0 + u * (c1 + u * (c2 + u * (c3 + u * (c4 + u * c5)))))
    if ay > ax:
        r = 0.5 * math.pi - r
    if x < 0:
        r = math.pi - r
    if y < 0:
        r = 2 * math.pi - r
    return r


@numba.njit(cache=True, nogil=True, fastmath=True)
def _score_one(mat, g, f2, count, image, n_r, n_a, calibration, r_min, r_sphere, precession_deg, excitation_width,
               power):
    """The score of one (3, 3) orientation matrix on one flat polar image, over the first ``count``
    of its (S, 3) reflections and (S,) |F|^2 (those of |F|^2 0 skipped): the same spot model as
    diffraction.spot_intensities, the same bilinear read as ``SpotRefiner.score_reference``.
    Compiled with fastmath, as the refinement's other kernels: the scores within 1e-9 (relative)
    of the numpy definition, and 1200 moderate patterns (seeds 7 and 11, hard seed 7) gave the
    same figures to the digit; the refinement's CPU 15% less (0.73 -> 0.61 s of 1200, one thread).
    """
    phi = math.radians(precession_deg)
    p_z, p_t = r_sphere * math.cos(phi), r_sphere * math.sin(phi)
    sigma = math.pi / excitation_width
    two_pi = 2.0 * math.pi
    num = 0.0
    den = 0.0
    for k in range(count):
        if f2[k] == 0.0:
            continue
        gx, gy, gz = g[k, 0], g[k, 1], g[k, 2]
        lx = gx * mat[0, 0] + gy * mat[1, 0] + gz * mat[2, 0]
        ly = gx * mat[0, 1] + gy * mat[1, 1] + gz * mat[2, 1]
        lz = gx * mat[0, 2] + gy * mat[1, 2] + gz * mat[2, 2]
        r_spot = math.sqrt(lx * lx + ly * ly)
        r = r_spot / calibration - r_min
        if r < 0.0 or r > n_r - 1:  # off the polar image: no weight (checked first, the cheapest)
            continue
        s = -math.sqrt(max(r_sphere * r_sphere - r_spot * r_spot, 0.0)) + r_sphere - lz
        if precession_deg > 0:
            up = p_z - math.sqrt(max(r_sphere * r_sphere - (r_spot + p_t) ** 2, 0.0))
            down = p_z - math.sqrt(max(r_sphere * r_sphere - (r_spot - p_t) ** 2, 0.0))
            if not (lz - excitation_width <= up and lz + excitation_width >= down):
                continue
            u = sigma * sigma * (r_spot * r_spot * phi * phi - s * s) + 1.0
            zz = math.sqrt(u * u + 4.0 * sigma * sigma * s * s)
            factor = (sigma / math.pi) * math.sqrt(2.0 * (u + zz) / (zz * zz))
        else:
            if not abs(s) < excitation_width:
                continue
            factor = sigma / (math.pi * (sigma * sigma * s * s + 1.0))
        w = abs(factor * f2[k])
        w = math.sqrt(w) if power == 0.5 else w**power  # sqrt: 2x faster than the general power
        r = min(r, n_r - 1.001)
        # The spot's angle (polar_angle) and the angle index's wrap without the float and integer
        # modulo (a third of the score's time)
        a = _polar_angle(ly, lx) * (n_a / two_pi)
        r0 = int(r)
        a_floor = math.floor(a)
        a0 = int(a_floor)
        if a0 >= n_a:
            a0 -= n_a
        a1 = a0 + 1 if a0 + 1 < n_a else 0
        fr, fa = r - r0, a - a_floor
        base0, base1 = r0 * n_a, (r0 + 1) * n_a
        value = ((1 - fr) * (1 - fa) * image[base0 + a0] + (1 - fr) * fa * image[base0 + a1]
                 + fr * (1 - fa) * image[base1 + a0] + fr * fa * image[base1 + a1])
        num += w * value
        den += w * w
    return num / max(math.sqrt(den), 1e-12)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _score_trials(matrices, g, f2, polar, rows, n_r, n_a, calibration, r_min, wavelength_a, precession_deg,
                  excitation_width, power):
    """The compiled ``SpotRefiner.score_reference`` for (n, m) trial matrices sharing each row's
    reflections."""
    n, m = matrices.shape[0], matrices.shape[1]
    out = np.zeros((n, m))
    for i in range(n):
        image = polar[rows[i]]
        for j in range(m):
            out[i, j] = _score_one(matrices[i, j], g[i], f2[i], g.shape[1], image, n_r, n_a, calibration, r_min,
                                   1.0 / wavelength_a, precession_deg, excitation_width, power)
    return out


@numba.njit(cache=True, nogil=True, fastmath=True)
def _is_near(g, mat, r_sphere, near_sphere, calibration, r_lo, r_hi):
    """Whether the (3,) reflection, turned by the (3, 3) orientation, lies within ``near_sphere``
    of the Ewald sphere and between radii ``r_lo`` and ``r_hi`` pixels."""
    gx, gy, gz = g[0], g[1], g[2]
    lx = gx * mat[0, 0] + gy * mat[1, 0] + gz * mat[2, 0]
    ly = gx * mat[0, 1] + gy * mat[1, 1] + gz * mat[2, 1]
    lz = gx * mat[0, 2] + gy * mat[1, 2] + gz * mat[2, 2]
    r2 = lx * lx + ly * ly
    s = abs(r_sphere - math.sqrt(max(r_sphere * r_sphere - r2, 0.0)) - lz)
    r_px = math.sqrt(r2) / calibration
    return s < near_sphere and r_px >= r_lo and r_px <= r_hi


@numba.njit(cache=True, nogil=True, fastmath=True)
def _refine_compiled(all_g, all_f2, matrices, moves, polar, rows, n_r, n_a, calibration, r_min, r_max, wavelength_a,
                     precession_deg, excitation_width, power, pool_sphere, near_sphere, moves_per_step):
    """``SpotRefiner.refine_reference`` a candidate at a time (each candidate's search is its own:
    the page-wide version only batches them): the phase's (G, 3) reflections and (G,) |F|^2, (n, 3, 3)
    start matrices, (steps, 6, 3, 3) moves, (B, R*A) polar images, (n,) rows -> refined (n, 3, 3),
    scores (n,)."""
    n, n_all = matrices.shape[0], all_f2.shape[0]
    r_sphere = 1.0 / wavelength_a
    r_lo, r_hi = r_min - 1.0, r_max + 1.0
    out = matrices.copy()
    scores = np.zeros(n)
    pool = np.empty(n_all, np.int64)
    followed = np.empty(n_all, np.int64)  # the pool's reflections followed at this step
    g = np.empty((n_all, 3))
    f2 = np.empty(n_all)
    trial = np.empty((3, 3))
    best_trial = np.empty((3, 3))
    for i in range(n):
        current = out[i]
        image = polar[rows[i]]
        # The pool: the reflections within pool_sphere where the candidate starts.
        n_pool = 0
        for k in range(n_all):
            if all_f2[k] > 0.0 and _is_near(all_g[k], current, r_sphere, pool_sphere, calibration, r_lo, r_hi):
                pool[n_pool] = k
                n_pool += 1
        count = -1
        best = 0.0
        for step in range(moves.shape[0] + 1):
            # The reflections followed at this step: the pool's near the sphere where it stands now.
            same = count >= 0  # as the step before's: its last score is this orientation's, bit for bit
            n_followed = 0
            for t in range(n_pool):
                k = pool[t]
                if _is_near(all_g[k], current, r_sphere, near_sphere, calibration, r_lo, r_hi):
                    if same and (n_followed >= count or followed[n_followed] != t):
                        same = False
                    followed[n_followed] = t
                    g[n_followed] = all_g[k]
                    f2[n_followed] = all_f2[k]
                    n_followed += 1
            same = same and n_followed == count
            count = n_followed
            if not same:
                best = _score_one(current, g, f2, count, image, n_r, n_a, calibration, r_min, r_sphere,
                                  precession_deg, excitation_width, power)
            if step == moves.shape[0]:  # after the last step: the final score
                scores[i] = best
                break
            for _ in range(moves_per_step):
                top = -np.inf
                pick = -1
                for m in range(moves.shape[1]):
                    move = moves[step, m]
                    for a in range(3):
                        for c in range(3):
                            trial[a, c] = (current[a, 0] * move[0, c] + current[a, 1] * move[1, c]
                                           + current[a, 2] * move[2, c])
                    value = _score_one(trial, g, f2, count, image, n_r, n_a, calibration, r_min, r_sphere,
                                       precession_deg, excitation_width, power)
                    if pick < 0 or value > top:  # the first of the best, as argmax
                        top, pick = value, m
                        best_trial[:] = trial
                if not top > best:
                    break
                current[:] = best_trial
                best = top
    return out, scores


@numba.njit(cache=True, nogil=True)
def _energy_near_spots(polar, rows, n, spot, r_index, a_index, half):
    """``SpotRefiner.explained``'s share for n orientations: each one's spots (``spot``, its index,
    ascending) mark their polar bins within a radial bin and ``half`` angular bins of (r_index,
    a_index); the share of the image's (polar[rows[i]]) energy in the marked bins. Compiled: the
    numpy mask over (n, R, A) cost 0.1 ms a pattern."""
    n_r, n_a = polar.shape[1], polar.shape[2]
    out = np.zeros(n)
    mask = np.zeros((n_r, n_a), np.bool_)
    k = 0
    for i in range(n):
        mask[:] = False
        while k < len(spot) and spot[k] == i:
            for dr in range(-1, 2):
                ri = min(max(r_index[k] + dr, 0), n_r - 1)
                for da in range(-half[k], half[k] + 1):
                    mask[ri, (a_index[k] + da) % n_a] = True
            k += 1
        image = polar[rows[i]]
        near, total = 0.0, 0.0
        for ri in range(n_r):
            for ai in range(n_a):
                e = image[ri, ai] * image[ri, ai]
                total += e
                if mask[ri, ai]:
                    near += e
        out[i] = near / max(total, 1e-12)
    return out


@numba.njit(cache=True, nogil=True)
def _near_rows(i, pool_g, pool_f2, mat, r_sphere, near_sphere, calibration, r_lo, r_hi, near):
    """Marks in ``near`` the reflections (G, 3), (G,) near the sphere and on the image for one
    orientation; returns how many."""
    count = 0
    for k in range(pool_f2.shape[0]):
        if pool_f2[k] <= 0.0:
            continue
        if _is_near(pool_g[k], mat, r_sphere, near_sphere, calibration, r_lo, r_hi):
            near[i, k] = True
            count += 1
    return count


@numba.njit(cache=True, nogil=True)
def _near_pool(pool_g, pool_f2, matrices, r_sphere, near_sphere, calibration, r_lo, r_hi):
    """``SpotRefiner._subset`` compiled: each orientation's (n, P, 3), (n, P) pool reflections
    within ``near_sphere`` of the Ewald sphere and between radii ``r_lo`` and ``r_hi`` pixels, in
    pool order, as (n, S, 3) g and (n, S) |F|^2, zero-padded to the longest row (at least 1)."""
    n, n_p = pool_f2.shape
    near = np.zeros((n, n_p), np.bool_)
    width = 1
    for i in range(n):
        width = max(width, _near_rows(i, pool_g[i], pool_f2[i], matrices[i], r_sphere, near_sphere, calibration,
                                      r_lo, r_hi, near))
    g = np.zeros((n, width, 3))
    f2 = np.zeros((n, width))
    for i in range(n):
        j = 0
        for k in range(n_p):
            if near[i, k]:
                g[i, j] = pool_g[i, k]
                f2[i, j] = pool_f2[i, k]
                j += 1
    return g, f2


@numba.njit(cache=True, nogil=True)
def _near_all(all_g, all_f2, matrices, r_sphere, near_sphere, calibration, r_lo, r_hi):
    """``_near_pool`` choosing among the phase's (G, 3), (G,) reflections, the same for every
    orientation."""
    n, n_p = matrices.shape[0], all_f2.shape[0]
    near = np.zeros((n, n_p), np.bool_)
    width = 1
    for i in range(n):
        width = max(width, _near_rows(i, all_g, all_f2, matrices[i], r_sphere, near_sphere, calibration,
                                      r_lo, r_hi, near))
    g = np.zeros((n, width, 3))
    f2 = np.zeros((n, width))
    for i in range(n):
        j = 0
        for k in range(n_p):
            if near[i, k]:
                g[i, j] = all_g[k]
                f2[i, j] = all_f2[k]
                j += 1
    return g, f2
