"""Rendering a phantom case (:mod:`prism_export.phantom_patient`) into a radiograph.

Anatomy is defined analytically in patient coordinates (x, y in about [-1, 1], y down) and evaluated
at every pixel through the patient's pose (shift, rotation, scale), so nothing is resampled and every
structure has compact support (smoothstep edges, no Gaussian tails); the heart, an effusion and the
devices are drawn on top, then the exposure. Per-patient layers are cached, so rendering a case and
its counterfactuals draws the anatomy once. numpy and scipy.ndimage only.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .phantom_patient import Attributes, Patient, Side

_NOISE_STREAM = 0x9015E


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------
def _smooth(t):
    """Smoothstep on [0, 1], clipped: compact support, C1."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _coords(p: Patient, size: int):
    """Patient coordinates (x, y) of every pixel centre, through the pose."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    X, Y = np.meshgrid(c, c)
    X, Y = X - p.shift[0], Y - p.shift[1]
    cs, sn = np.cos(p.rotation), np.sin(p.rotation)
    x = (cs * X + sn * Y) / p.scale
    y = (-sn * X + cs * Y) / p.scale
    return x, y


def _to_pixels(p: Patient, size: int, pts: np.ndarray) -> np.ndarray:
    """Patient coordinates (N, 2) → pixel coordinates (col, row) as floats."""
    cs, sn = np.cos(p.rotation), np.sin(p.rotation)
    x, y = pts[:, 0] * p.scale, pts[:, 1] * p.scale
    X = cs * x - sn * y + p.shift[0]
    Y = sn * x + cs * y + p.shift[1]
    return np.stack([(X + 1.0) / 2.0 * size - 0.5, (Y + 1.0) / 2.0 * size - 0.5], axis=1)


def _lateral_limit(p: Patient, y):
    """Inner rib margin |x| as a function of y: widest at mid_y, narrowing to the apex."""
    t = np.clip((p.mid_y - y) / (p.mid_y - p.apex_y + 0.12), 0.0, 1.0)
    below = np.clip((y - p.mid_y) / 0.8, 0.0, 1.0)
    return p.thorax_half_width * (1.0 - 0.5 * t ** 2.2) * (1.0 - 0.05 * below)


def _diaphragm(p: Patient, q, side: int):
    """y of the diaphragm under the lung of ``side`` (-1 image left = patient right)."""
    dome = p.dome_y_right if side < 0 else p.dome_y_left
    qd = 0.42 * p.thorax_half_width
    t = (q - qd) / (p.thorax_half_width - qd)
    return dome + p.cp_depth * np.where(t > 0, t ** 2, 0.4 * t ** 2)


def _medial_limit(p: Patient, side: int):
    return p.mediastinum_half_width * 0.75 + side * p.mediastinum_x


def _lung_margin(p: Patient, x, y, side: int):
    """Signed margin (≈ distance, positive inside) of one lung."""
    q = side * x
    lat = _lateral_limit(p, y) - q
    med = q - _medial_limit(p, side)
    qa = 0.45 * p.thorax_half_width
    top = y - (p.apex_y + 1.1 * (q - qa) ** 2)
    bottom = _diaphragm(p, q, side) - y
    return np.minimum(np.minimum(lat, med), np.minimum(top, bottom))


def _heart_params(p: Patient, ctr: float):
    """Ellipse (cx, cy, a, b, angle) with horizontal extent = ctr × thorax width."""
    th = p.heart_angle
    target = ctr * 2.0 * p.thorax_half_width / 2.0  # half width
    k = np.sqrt(np.cos(th) ** 2 + (p.heart_aspect * np.sin(th)) ** 2)
    a = target / k
    b = p.heart_aspect * a
    a0 = p.ctr * p.thorax_half_width / k
    b0 = p.heart_aspect * a0
    # grow about the upper right border (image left, top): the heart enlarges to the patient's
    # left (image right) and downward, as in cardiomegaly
    ax, ay = p.heart_x - 0.55 * a0, p.heart_y - 0.75 * b0
    s = a / a0
    return ax + (p.heart_x - ax) * s, ay + (p.heart_y - ay) * s, a, b, th


def _ellipse_r2(x, y, cx, cy, a, b, th):
    cs, sn = np.cos(th), np.sin(th)
    u = (x - cx) * cs + (y - cy) * sn
    v = -(x - cx) * sn + (y - cy) * cs
    return (u / a) ** 2 + (v / b) ** 2


@lru_cache(maxsize=8)
def _noise_fields(seed: int, size: int):
    """Lung texture (patient-resolution, sampled through the pose) and quantum noise (pixels)."""
    r = np.random.default_rng([seed, _NOISE_STREAM])
    n = 72
    fine = ndimage.gaussian_filter(r.standard_normal((n, n)), 1.0, mode="wrap")
    coarse = ndimage.gaussian_filter(r.standard_normal((n, n)), 3.5, mode="wrap")
    fine /= fine.std() + 1e-12
    coarse /= coarse.std() + 1e-12
    vessels = 1.0 - np.abs(np.tanh(1.2 * fine))  # ridges: vessel-like markings
    texture = 0.65 * vessels + 0.35 * coarse * 0.5
    rq = np.random.default_rng([seed, _NOISE_STREAM, size])
    quantum = ndimage.gaussian_filter(rq.standard_normal((size, size)), 0.55)
    quantum /= quantum.std() + 1e-12
    return texture, quantum.astype(np.float32)


def _sample_grid(grid: np.ndarray, x, y):
    """Bilinear sample of a grid covering patient coords [-1.2, 1.2]² (wrapping)."""
    n = grid.shape[0]
    gi = (y + 1.2) / 2.4 * (n - 1)
    gj = (x + 1.2) / 2.4 * (n - 1)
    return ndimage.map_coordinates(grid, [gi.ravel(), gj.ravel()], order=1, mode="grid-wrap").reshape(x.shape)


# --------------------------------------------------------------------------------------------
# Anatomy (cached per patient and size)
# --------------------------------------------------------------------------------------------
@dataclass
class _Anatomy:
    base: np.ndarray  # attenuation without lungs' air, heart, fluid, devices
    air: np.ndarray  # lung air (what the heart, mediastinum and fluid displace)
    lungs: dict  # side → lung coverage (0…1)
    thorax: np.ndarray  # bool
    x: np.ndarray
    y: np.ndarray
    quantum: np.ndarray
    px: float  # one pixel in patient units


@lru_cache(maxsize=16)
def _anatomy(p: Patient, size: int) -> _Anatomy:
    x, y = _coords(p, size)
    px = 2.0 / (size * p.scale)
    texture_grid, quantum = _noise_fields(p.seed, size)
    W = p.thorax_half_width

    # body: soft-tissue thickness, neck and shoulders
    bw = 0.22 + (p.body_half_width - 0.22) * _smooth((y + 0.98) / 0.42)
    bw = bw + 0.05 * np.clip(y - 0.3, 0, None)
    inside = np.clip(1.0 - (x / bw) ** 2, 0.0, None)
    body = np.sqrt(inside) * _smooth((bw - np.abs(x)) / 0.06)
    base = 1.35 * body

    # lungs (air) with texture
    tex = _sample_grid(texture_grid, x, y)
    lungs, air = {}, np.zeros_like(x)
    for side in (-1, 1):
        m = _lung_margin(p, x, y, side)
        cov = _smooth(m / 0.05)
        lungs[side] = cov
        # thinner air layer near the apex and the base (curved lung surfaces)
        depth = _smooth(m / 0.18) * 0.35 + 0.65
        air = air + cov * depth
    # vessels: denser near the hila, fading to the periphery
    q = np.abs(x)
    hil = np.exp(-((q - 0.22) ** 2 / 0.08 + (y + 0.05) ** 2 / 0.12))
    base = base + p.texture_amp * (0.05 + 0.14 * hil) * tex * (lungs[-1] + lungs[1])
    # hilar shadows
    for side in (-1, 1):
        hx = side * (p.mediastinum_half_width + 0.1)
        r2 = ((x - hx) / 0.09) ** 2 + ((y + 0.05) / 0.14) ** 2
        base = base + 0.12 * _smooth(1.0 - r2)

    # mediastinum, trachea, aortic knob, spine
    mx = p.mediastinum_x + 0.05 * np.clip(y + 0.1, 0, None)
    mw = p.mediastinum_half_width * (0.85 + 0.45 * _smooth((y + 0.5) / 0.6))
    med = _smooth((mw - np.abs(x - mx)) / 0.03) * _smooth((y + 1.0) / 0.2)
    knob = _smooth((1.0 - (((x - mx - mw + 0.02) / 0.07) ** 2 + ((y + 0.36) / 0.075) ** 2)) / 0.5)
    med = np.maximum(med, knob)
    air = air * (1.0 - med)
    base = base + 0.18 * med
    trachea = _smooth((0.035 - np.abs(x - p.mediastinum_x + 0.01 * (y + 0.3))) / 0.012) \
        * _smooth((-0.25 - y) / 0.05) * _smooth((y + 1.1) / 0.1)
    base = base - 0.22 * trachea
    sx = p.mediastinum_x * 0.5
    spine = _smooth((0.075 - np.abs(x - sx)) / 0.02)
    vert = 0.75 + 0.25 * np.cos(2 * np.pi * (y - p.rib_y0) / p.rib_dy) ** 2
    pedicles = _smooth((0.018 - np.abs(np.abs(x - sx) - 0.055)) / 0.01) * 0.6
    base = base + 0.22 * spine * vert + 0.1 * pedicles * vert

    # abdomen below the diaphragm: soft tissue replacing lung; gastric bubble under the left dome
    gb = _smooth((1.0 - (((x - 0.38 * W) / 0.13) ** 2 + ((y - p.dome_y_left - 0.13) / 0.07) ** 2)) / 0.4)
    base = base - 0.18 * gb

    # ribs: posterior (bright bands with cortices) and anterior (fainter, sloping down medially)
    for side in (-1, 1):
        qs = side * x
        lim = _lateral_limit(p, y)
        v = y + p.rib_tilt * qs - p.rib_curve * qs ** 2
        ph = (v - p.rib_y0) / p.rib_dy
        k = np.clip(np.round(ph), 0, 9)
        d = np.abs(v - (p.rib_y0 + k * p.rib_dy)) * (1.0 - 0.25 * qs)
        hw = p.rib_width / 2
        prof = _smooth((hw - d) / 0.012) * (0.55 + 0.45 * (d / hw) ** 2)
        reach = _smooth((lim + 0.06 - qs) / 0.05) * _smooth((qs - 0.06) / 0.04)
        base = base + 0.2 * prof * reach * (0.4 + 0.6 * _smooth((_diaphragm(p, np.abs(qs), side) + 0.1 - y) / 0.15))
        va = y - 0.45 * qs - 0.3 * qs ** 2
        pha = (va - p.rib_y0 + 0.5) / (p.rib_dy * 1.05)
        ka = np.clip(np.round(pha), 0, 7)
        da = np.abs(va - (p.rib_y0 - 0.5 + ka * p.rib_dy * 1.05))
        profa = _smooth((hw * 0.9 - da) / 0.015)
        reacha = _smooth((lim - qs) / 0.06) * _smooth((qs - 0.3) / 0.15)
        base = base + 0.1 * profa * reacha
        # clavicle: S-curve from the sternal notch to the shoulder
        cq = np.clip(qs, 0, None)
        cy = p.clavicle_y - 0.12 * cq + 0.16 * cq ** 2 - 0.06 * np.sin(3.0 * cq)
        cd = np.abs(y - cy)
        clav = _smooth((0.032 - cd) / 0.012) * _smooth((qs - 0.07) / 0.05) * _smooth((0.78 - qs) / 0.08)
        base = base + 0.3 * clav * (0.7 + 0.3 * (cd / 0.032) ** 2)
        # pectoral / breast soft tissue over the lower lateral lung
        base = base + 0.12 * _smooth((qs - 0.3) / 0.4) * _smooth((y + 0.2) / 0.5)

    thorax = (np.abs(x - 0.0) < _lateral_limit(p, y)) & (y > p.apex_y - 0.05) & \
        (y < np.maximum(_diaphragm(p, np.abs(x), -1), _diaphragm(p, np.abs(x), 1)))
    return _Anatomy(base=base, air=air, lungs=lungs, thorax=thorax, x=x, y=y, quantum=quantum, px=px)


@lru_cache(maxsize=16)
def _heart(p: Patient, size: int, ctr: float):
    """(density, coverage) of the heart at cardiothoracic ratio ``ctr``."""
    a = _anatomy(p, size)
    cx, cy, ha, hb, th = _heart_params(p, ctr)
    r2 = _ellipse_r2(a.x, a.y, cx, cy, ha, hb, th)
    cov = _smooth((1.0 - r2) / 0.12)
    dens = cov * (0.75 + 0.25 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)))
    return dens, cov


@lru_cache(maxsize=16)
def _fluid(p: Patient, size: int, side: Side, amount: float):
    """Pleural fluid of one side: fills the lung base up to a meniscus rising laterally."""
    a = _anatomy(p, size)
    s = -1 if side == "right" else 1
    q = s * a.x
    W = p.thorax_half_width
    cp = float(_diaphragm(p, np.asarray(W), s))
    med = _medial_limit(p, s)
    t = np.clip((q - med) / (W - med), 0.0, 1.0)
    lateral_top = cp - (0.18 + 0.4 * amount)
    top = lateral_top + (0.10 + 0.06 * amount) * (1.0 - t ** 2)  # concave upward, rising laterally
    fade = 0.09 + 0.04 * amount
    m = _lung_margin(p, a.x, a.y, s)
    region = _smooth((m + 0.06) / 0.04)  # the lung plus a rim (blunts the costophrenic angle)
    return region * _smooth((a.y - top) / fade)


# --------------------------------------------------------------------------------------------
# Devices (splatted as anti-aliased capsules: exactly zero away from the device)
# --------------------------------------------------------------------------------------------
def _spline(points, n_per: int = 40) -> np.ndarray:
    """Catmull–Rom through control points (patient coords)."""
    P = np.asarray(points, dtype=np.float64)
    P = np.vstack([2 * P[0] - P[1], P, 2 * P[-1] - P[-2]])
    out = []
    t = np.linspace(0.0, 1.0, n_per, endpoint=False)[:, None]
    for i in range(1, len(P) - 2):
        p0, p1, p2, p3 = P[i - 1], P[i], P[i + 1], P[i + 2]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    out.append(P[-2][None])
    return np.vstack(out)


def _splat_curve(layer: np.ndarray, p: Patient, pts_patient: np.ndarray, width: float, value: float):
    """Draw a curve ``width`` (patient units) wide with coverage × ``value`` (max-composited)."""
    size = layer.shape[0]
    pix = _to_pixels(p, size, pts_patient)
    # resample to ≤ 0.25 px spacing
    seg = np.linalg.norm(np.diff(pix, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return
    n = int(np.ceil(s[-1] / 0.25)) + 1
    si = np.linspace(0.0, s[-1], n)
    pix = np.stack([np.interp(si, s, pix[:, 0]), np.interp(si, s, pix[:, 1])], axis=1)
    hw = max(width / 2.0 * size / 2.0 * p.scale, 0.5)
    R = int(np.ceil(hw + 1.0))
    off = np.arange(-R, R + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    base = np.round(pix).astype(np.int64)
    cols = base[:, 0, None, None] + ox[None]
    rows = base[:, 1, None, None] + oy[None]
    d = np.hypot(cols - pix[:, 0, None, None], rows - pix[:, 1, None, None])
    cov = np.clip(hw + 0.5 - d, 0.0, 1.0) * value
    ok = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size) & (cov > 0)
    np.maximum.at(layer, (rows[ok], cols[ok]), cov[ok])


def _box(x, y, cx, cy, hw, hh, ang, radius, px):
    cs, sn = np.cos(ang), np.sin(ang)
    u = (x - cx) * cs + (y - cy) * sn
    v = -(x - cx) * sn + (y - cy) * cs
    du, dv = np.abs(u) - hw + radius, np.abs(v) - hh + radius
    sd = np.hypot(np.clip(du, 0, None), np.clip(dv, 0, None)) + np.minimum(np.maximum(du, dv), 0) - radius
    return np.clip(0.5 - sd / px, 0.0, 1.0), u, v


@lru_cache(maxsize=16)
def _devices(p: Patient, size: int, kinds: tuple[str, ...], seed: int) -> np.ndarray:
    """Device attenuation layer (≥ 0, exactly 0 away from the devices)."""
    a = _anatomy(p, size)
    r = np.random.default_rng([seed, p.seed])
    u = lambda lo, hi: float(r.uniform(lo, hi))  # noqa: E731
    layer = np.zeros((size, size), dtype=np.float64)
    lead_w = 2.0 / 64.0  # 2 px at 128
    W = p.thorax_half_width
    hx, hy, ha, hb, th = _heart_params(p, p.ctr)  # normal heart: devices don't move with cardiomegaly
    mx = p.mediastinum_x
    if "pacemaker" in kinds:
        side = 1 if r.random() < 0.8 else -1
        bx, by = side * u(0.42, 0.58) * W / 0.8, u(-0.62, -0.5)
        bw, bh, ang = u(0.065, 0.085), u(0.045, 0.06), u(-0.35, 0.35)
        box, bu, bv = _box(a.x, a.y, bx, by, bw, bh, ang, 0.025, a.px)
        # a darker battery window and a bright header give the can some structure
        inner, _, _ = _box(a.x, a.y, bx + 0.25 * bw * np.cos(ang), by + 0.25 * bw * np.sin(ang),
                           0.45 * bw, 0.55 * bh, ang, 0.01, a.px)
        layer = np.maximum(layer, box * (1.0 - 0.3 * inner))
        n_leads = int(r.integers(1, 4))
        targets = [(hx + 0.55 * ha, hy + 0.55 * hb),  # RV apex
                   (hx - 0.55 * ha, hy - 0.45 * hb),  # right atrium
                   (hx + 0.1 * ha, hy + 0.55 * hb)]   # coronary sinus / LV
        for i in range(n_leads):
            tx, ty = targets[i]
            start = (bx - side * bw * 0.9, by + u(-0.3, 0.3) * bh)
            loop = (bx - side * u(0.0, 0.08), by + bh + u(0.04, 0.1))
            pts = [start, loop, (bx - side * 0.25, by - 0.03 + u(-0.03, 0.03)),
                   (mx - 0.08 + u(-0.02, 0.02), -0.38 + u(-0.03, 0.03)),
                   (mx - 0.1 + u(-0.02, 0.02), hy - hb * 0.6),
                   ((mx - 0.1 + tx) / 2, (hy - hb * 0.6 + ty) / 2 + u(-0.04, 0.04)), (tx, ty)]
            _splat_curve(layer, p, _spline(pts), lead_w * u(0.85, 1.2), 0.9)
            _splat_curve(layer, p, _spline([pts[-2], (tx, ty)], 8)[-6:], lead_w * 1.6, 1.0)  # electrode tip
    if "ecg" in kinds:
        spots = [(-0.55, -0.62), (0.55, -0.62), (-0.72, 0.32), (0.72, 0.32), (0.45, 0.1)]
        idx = r.permutation(len(spots))[: int(r.integers(2, 5))]
        for i in idx:
            ex, ey = spots[i][0] * W / 0.8 + u(-0.05, 0.05), spots[i][1] + u(-0.05, 0.05)
            rad = u(0.045, 0.06)
            d = np.hypot(a.x - ex, a.y - ey)
            disc = np.clip(0.5 - (d - rad) / a.px, 0.0, 1.0)
            ring = np.clip(0.5 - (np.abs(d - rad * 0.75) - rad * 0.18) / a.px, 0.0, 1.0)
            snap = np.clip(0.5 - (d - rad * 0.35) / a.px, 0.0, 1.0)
            layer = np.maximum(layer, 0.35 * disc + 0.25 * ring + 0.5 * snap)
            # wire leaving the image
            end = (np.sign(ex) * 1.3, ey - u(0.2, 0.5)) if r.random() < 0.5 else (ex + u(-0.3, 0.3), -1.3)
            mid = ((ex + end[0]) / 2 + u(-0.15, 0.15), (ey + end[1]) / 2 + u(-0.15, 0.15))
            _splat_curve(layer, p, _spline([(ex, ey), mid, end]), lead_w * 0.8, 0.6)
    if "line" in kinds:
        side = -1 if r.random() < 0.7 else 1
        pts = [(side * u(0.2, 0.3), -1.25), (side * u(0.18, 0.24), -0.8), (side * 0.14 + mx, -0.55),
               (mx - 0.07, -0.35), (mx - 0.07 + u(-0.02, 0.02), u(-0.2, -0.05))]
        _splat_curve(layer, p, _spline(pts), lead_w * u(0.9, 1.2), 0.75)
    if "ett" in kinds:
        tip = u(-0.48, -0.36)
        pts = [(mx + 0.01, -1.3), (mx + 0.005, -0.8), (mx, tip)]
        _splat_curve(layer, p, _spline(pts), lead_w * 3.0, 0.15)  # tube wall
        stripe = [(px_ + 0.014, py_) for px_, py_ in pts]
        _splat_curve(layer, p, _spline(stripe), lead_w, 1.0)  # radiopaque stripe
    return layer


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def compose(p: Patient, at: Attributes, size: int) -> np.ndarray:
    """The radiograph of ``at`` on ``p``: float32 size×size in [0, 1]."""
    a = _anatomy(p, size)
    heart, hcov = _heart(p, size, at.cardiomegaly_ctr if at.cardiomegaly else p.ctr)
    A = a.base + 0.06 * heart
    air = a.air * (1.0 - hcov)
    if at.effusion is not None:
        fl = _fluid(p, size, at.effusion, round(at.effusion_size, 6))
        air = air * (1.0 - fl)
        A = A + 0.12 * fl
    A = A - 1.0 * air
    if at.devices:
        A = A + 3.0 * _devices(p, size, tuple(at.device_kinds), at.device_seed)
    # exposure: film-like saturation, then gamma and window
    img = 1.0 - np.exp(-p.exposure * np.clip(A, 0.0, None) * 1.2)
    img = img ** p.gamma
    img = p.black + (p.white - p.black) * img
    img = img + p.noise_sigma * a.quantum * (0.6 + 0.4 * img)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def anatomy_masks(p: Patient, at: Attributes, size: int) -> dict[str, np.ndarray]:
    """"heart" (the heart as drawn for ``at``), "lungs", "thorax" (between the inner rib margins,
    above the diaphragm) as bool masks."""
    a = _anatomy(p, size)
    _, hcov = _heart(p, size, at.cardiomegaly_ctr if at.cardiomegaly else p.ctr)
    return {"heart": hcov >= 0.5, "lungs": (a.lungs[-1] + a.lungs[1]) >= 0.5, "thorax": a.thorax}
