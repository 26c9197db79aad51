"""Pixels: figures, props and scene backgrounds drawn with PIL, one image per `ImageSpec`.

`render_image` is the only source of an image's randomness (seeded from seed, stream and
index); `_render_chunk` is the worker entry point that encodes and writes a batch of images.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tpas.demo.poses import R_HEAD, W_ARM, W_LEG, _compose, _Fig, _Prop, _rot, _u
from tpas.demo.sampling import _pick, sample_appearance
from tpas.demo.vocabulary import (
    _BUILD_WIDTH,
    COLOURS,
    HAIR_COLOURS,
    SKIN_TONES,
    ImageSpec,
)

_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing for thin limbs

RGB = tuple[int, int, int]


def _shade(c: Sequence[float], f: float) -> RGB:
    return tuple(int(max(0, min(255, v * f))) for v in c)  # type: ignore[return-value]


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull (monotone chain); used for coats and skirts that span both legs."""
    pts = sorted(set(points))
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


class _Painter:
    """Maps body units to pixels and draws rounded limbs, discs and polygons."""

    def __init__(self, draw: ImageDraw.ImageDraw, scale: float, ox: float, oy: float):
        self.d, self.s, self.ox, self.oy = draw, scale, ox, oy

    def px(self, p: np.ndarray) -> tuple[float, float]:
        return (self.ox + self.s * float(p[0]), self.oy - self.s * float(p[1]))

    def limb(self, pts: list[np.ndarray], width: float, colour: RGB) -> None:
        xy = [self.px(p) for p in pts]
        w = max(1.0, width * self.s)
        self.d.line(xy, fill=colour, width=round(w), joint="curve")
        for x, y in (xy[0], xy[-1]):
            r = w / 2
            self.d.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def disc(self, c: np.ndarray, r: float, colour: RGB) -> None:
        x, y = self.px(c)
        r *= self.s
        self.d.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def poly(self, pts: list[np.ndarray], colour: RGB) -> None:
        self.d.polygon([self.px(p) for p in pts], fill=colour)

    def slice(self, c: np.ndarray, r: float, centre_dir: np.ndarray, span: float, colour: RGB) -> None:
        """Filled circular sector around body-frame direction `centre_dir` (hair, hats)."""
        x, y = self.px(c)
        r *= self.s
        ang = math.degrees(math.atan2(-centre_dir[1], centre_dir[0]))  # PIL: clockwise from +x
        self.d.pieslice((x - r, y - r, x + r, y + r), ang - span, ang + span, fill=colour)


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(*v))
    return v / n if n > 1e-9 else np.array([0.0, 1.0])


def _draw_figure(pt: _Painter, f: _Fig, rng: np.random.Generator) -> None:
    a, j = f.app, f.j
    side = f.view == "side"

    def jit(c: Sequence[float]) -> RGB:  # mild per-image lighting of each garment
        return _shade(c, _u(rng, 0.92, 1.06))

    top, bottom = jit(COLOURS[a.top_colour]), jit(COLOURS[a.bottom_colour])
    skin, hair = jit(SKIN_TONES[a.skin]), jit(HAIR_COLOURS[a.hair_colour])
    shoe = (35, 32, 30)
    bw = _BUILD_WIDTH[a.build]
    up = _unit(j["neck"] - j["hip"])
    perp = np.array([up[1], -up[0]])
    head_up = _unit(j["head"] - j["neck"])
    fwd = f.fwd
    back = -fwd if side else -head_up  # only used for side-view extras
    wl, wa = W_LEG * (0.9 + 0.2 * bw), W_ARM * (0.9 + 0.15 * bw)
    sw, hw = (0.06 * bw, 0.062 * bw) if side else (0.095 * bw, 0.078 * bw)
    shoulder_line = j["neck"] - up * 0.03

    def leg(i: int, f_: float) -> None:
        hp, kn, ft = j[f"hp{i}"], j[f"kn{i}"], j[f"ft{i}"]
        toe = ft + (fwd * 0.03 if side else np.zeros(2))
        pt.limb([ft, toe], wl * 0.8, _shade(shoe, f_))
        if a.bottom_type in ("trousers", "jeans"):
            pt.limb([hp, kn, ft], wl, _shade(bottom, f_))
        else:
            pt.limb([hp, kn, ft], wl * 0.82, _shade(skin, f_))
            if a.bottom_type == "shorts":
                pt.limb([hp, hp + (kn - hp) * 0.75], wl * 1.08, _shade(bottom, f_))

    def arm(i: int, f_: float) -> None:
        sh, el, ha = j[f"sh{i}"], j[f"el{i}"], j[f"ha{i}"]
        if a.top_type == "t-shirt":
            pt.limb([sh, el, ha], wa * 0.9, _shade(skin, f_))
            pt.limb([sh, sh + (el - sh) * 0.55], wa * 1.15, _shade(top, f_))
        else:
            pt.limb([sh, el, ha], wa, _shade(top, f_))
            pt.disc(ha, wa * 0.55, _shade(skin, f_))

    # Behind the body: backpack, hood.
    if a.bag == "backpack":
        bag = jit(COLOURS[a.bag_colour or "black"])
        c = j["hip"] + (j["neck"] - j["hip"]) * 0.58
        if side:
            c = c + back * (sw + 0.035)
            half_u, half_b = up * 0.1, back * 0.04
        else:
            half_u, half_b = up * 0.11, perp * (sw + 0.03)
        pt.poly([c + half_u + half_b, c + half_u - half_b, c - half_u - half_b, c - half_u + half_b], bag)
    if a.top_type == "hoodie":
        pt.disc(j["head"] + (back * 0.025 if side else -head_up * 0.01), R_HEAD * 1.22, _shade(top, 0.85))

    far = 0.72 if side else 1.0  # far-side limbs are darker so the two sides read apart
    if side:
        arm(0, far)
        leg(0, far)
    else:
        leg(0, 1.0)
        leg(1, 1.0)

    # Torso (coats reach down over the thighs, skirts span the hips).
    if a.top_type == "coat":
        pts = [shoulder_line + perp * sw, shoulder_line - perp * sw]
        for i in (0, 1):
            mid = j[f"hp{i}"] + (j[f"kn{i}"] - j[f"hp{i}"]) * 0.6
            pts += [tuple(mid + perp * 0.055), tuple(mid - perp * 0.055)]
        pts += [j["hip"] + perp * (hw + 0.01), j["hip"] - perp * (hw + 0.01)]
        pt.d.polygon(_hull([pt.px(np.asarray(p)) for p in pts]), fill=top)
    low = j["hip"] - up * 0.035
    pt.poly([shoulder_line - perp * sw, shoulder_line + perp * sw, low + perp * hw, low - perp * hw], top)
    pt.disc(shoulder_line - perp * (sw - wa * 0.4), wa * 0.62, top)
    pt.disc(shoulder_line + perp * (sw - wa * 0.4), wa * 0.62, top)
    if not side and a.top_type == "jacket":
        pt.limb([shoulder_line, low], 0.012, _shade(top, 0.6))
    if not side and a.top_type == "shirt":
        collar = (200, 200, 200) if a.top_colour == "white" else (235, 235, 235)
        pt.poly([shoulder_line - perp * 0.035, shoulder_line + perp * 0.035, shoulder_line - up * 0.04], collar)
    if a.bottom_type == "skirt":
        pts = []
        for i in (0, 1):
            mid = j[f"hp{i}"] + (j[f"kn{i}"] - j[f"hp{i}"]) * 0.55
            pts += [tuple(mid + perp * 0.06), tuple(mid - perp * 0.06)]
        pts += [
            tuple(low + perp * (hw + 0.005)),
            tuple(low - perp * (hw + 0.005)),
            tuple(j["hip"] + up * 0.02 + perp * hw),
            tuple(j["hip"] + up * 0.02 - perp * hw),
        ]
        pt.d.polygon(_hull([pt.px(np.asarray(p)) for p in pts]), fill=bottom)
    if side:
        leg(1, 1.0)

    if a.bag == "shoulder bag":
        bag = jit(COLOURS[a.bag_colour or "black"])
        spot = j["hip"] + (fwd * 0.02 if side else perp * (hw + 0.03))
        pt.limb([j["sh1"] if not side else shoulder_line, spot + up * 0.03], 0.014, bag)
        half_u, half_p = up * 0.04, (fwd if side else perp) * 0.045
        pt.poly([spot + half_u + half_p, spot + half_u - half_p, spot - half_u - half_p, spot - half_u + half_p], bag)
    elif a.bag == "backpack" and not side:
        strap = _shade(COLOURS[a.bag_colour or "black"], 0.9)
        for s_ in (-1, 1):
            top_end = shoulder_line + perp * s_ * sw * 0.55
            pt.limb([top_end, top_end + perp * s_ * sw * 0.05 - up * 0.14], 0.016, strap)

    if side:
        arm(1, 1.0)
    else:
        arm(0, 1.0)
        arm(1, 1.0)

    # Head: long hair hangs behind it, then the face disc, then the hair cap and any hat.
    head = j["head"]
    if a.hair_length == "long":
        hang = head + (back * R_HEAD * 0.45 if side else np.zeros(2))
        pt.limb([hang, hang - head_up * (R_HEAD + 0.07)], R_HEAD * (1.4 if side else 2.1), hair)
    pt.limb([j["neck"] - up * 0.01, head], 0.035, skin)
    pt.disc(head, R_HEAD, skin)
    hair_dir = _unit(head_up + back * 0.55) if side else head_up
    pt.slice(head, R_HEAD * 1.04, hair_dir, 100 if side else 92, hair)
    if a.hat != "none":
        hat = jit(COLOURS[a.hat_colour or "black"])
        side_dir = fwd if side else np.array([head_up[1], -head_up[0]])
        if a.hat == "cap":
            pt.slice(head, R_HEAD * 1.1, head_up, 90, hat)
            if side:
                pt.limb(
                    [head + head_up * R_HEAD * 0.25, head + head_up * R_HEAD * 0.2 + fwd * R_HEAD * 1.6],
                    R_HEAD * 0.3,
                    _shade(hat, 0.85),
                )
            else:
                pt.limb(
                    [
                        head + head_up * R_HEAD * 0.3 - side_dir * R_HEAD * 1.1,
                        head + head_up * R_HEAD * 0.3 + side_dir * R_HEAD * 1.1,
                    ],
                    R_HEAD * 0.28,
                    _shade(hat, 0.85),
                )
        else:
            pt.slice(head + head_up * R_HEAD * 0.2, R_HEAD * 1.08, head_up, 90, hat)
            pt.limb(
                [
                    head + head_up * R_HEAD * 0.22 - side_dir * R_HEAD * 1.05,
                    head + head_up * R_HEAD * 0.22 + side_dir * R_HEAD * 1.05,
                ],
                R_HEAD * 0.35,
                _shade(hat, 0.8),
            )


def _draw_prop(pt: _Painter, prop: _Prop, rng: np.random.Generator) -> None:
    if prop.kind == "ball":
        c = prop.pts[0]
        pt.disc(c, prop.size * 1.1, (30, 30, 30))
        pt.disc(c, prop.size, (250, 250, 250))
        pt.disc(c + np.array([prop.size * 0.2, prop.size * 0.1]), prop.size * 0.38, (30, 30, 30))
    elif prop.kind == "stick":
        pt.limb(prop.pts, prop.size, (70, 52, 38))
    elif prop.kind == "impact":
        c = prop.pts[0]
        for k in range(7):
            v = _rot(np.array([1.0, 0.0]), k * 360 / 7 + _u(rng, -15, 15))
            pt.limb([c + v * prop.size * 0.45, c + v * prop.size * 1.1], 0.012, (255, 250, 225))


# ---- backgrounds: muted palettes so clothing colours stay the most saturated thing in view ----


def _muted(rng: np.random.Generator, base: Sequence[int], spread: int = 18) -> RGB:
    offs = rng.integers(-spread, spread + 1, size=3)
    return tuple(int(max(0, min(255, c + o))) for c, o in zip(base, offs))  # type: ignore[return-value]


def _sky(d: ImageDraw.ImageDraw, W: int, hy: float, rng: np.random.Generator) -> None:
    d.rectangle((0, 0, W, hy), fill=_muted(rng, _pick(rng, [(168, 196, 222), (196, 204, 212), (214, 214, 206)])))


def _bg_street(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    x = -rng.integers(0, 20)
    while x < W:
        w = int(rng.integers(W // 4, W // 2))
        top = hy - _u(rng, 0.15, 0.4) * H
        col = _muted(rng, _pick(rng, [(150, 130, 115), (170, 160, 145), (120, 120, 125), (160, 140, 120)]))
        d.rectangle((x, top, x + w, hy), fill=col)
        win = _shade(col, 0.7)
        for wy in np.arange(top + 6, hy - 8, 14):
            for wx in np.arange(x + 4, x + w - 8, 12):
                d.rectangle((wx, wy, wx + 6, wy + 8), fill=win)
        x += w
    road_bottom = hy + (H - hy) * _u(rng, 0.25, 0.45)
    d.rectangle((0, hy, W, road_bottom), fill=_muted(rng, (78, 78, 82), 8))
    mid = (hy + road_bottom) / 2
    for lx in range(int(rng.integers(-20, 0)), W, 36):
        d.rectangle((lx, mid - 1, lx + 18, mid + 1), fill=(225, 225, 215))
    walk = _muted(rng, (175, 172, 165), 10)
    d.rectangle((0, road_bottom, W, H), fill=walk)
    d.rectangle((0, road_bottom, W, road_bottom + 3), fill=_shade(walk, 0.75))
    for ly in np.arange(road_bottom + 14, H, 18):
        d.line((0, ly, W, ly), fill=_shade(walk, 0.88), width=1)


def _bg_park(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    for _ in range(int(rng.integers(3, 7))):
        tx, r = _u(rng, 0, W), _u(rng, 10, 24)
        d.rectangle((tx - 2, hy - r, tx + 2, hy + 2), fill=(90, 66, 45))
        d.ellipse((tx - r, hy - 2.4 * r, tx + r, hy - 0.6 * r), fill=_muted(rng, (58, 100, 52), 12))
    grass = _muted(rng, (100, 150, 78), 12)
    d.rectangle((0, hy, W, H), fill=grass)
    for _ in range(60):
        gx, gy = _u(rng, 0, W), _u(rng, hy, H)
        d.line((gx, gy, gx + _u(rng, -2, 2), gy - 4), fill=_shade(grass, 0.82), width=1)
    if rng.random() < 0.5:
        cx = _u(rng, 0.2, 0.8) * W
        path = _muted(rng, (196, 180, 150), 10)
        d.polygon([(cx - 6, hy), (cx + 6, hy), (cx + W * 0.5, H), (cx - W * 0.5, H)], fill=path)


def _bg_indoor(d, W, H, hy, rng):
    wall = _muted(rng, _pick(rng, [(222, 212, 190), (196, 206, 210), (205, 214, 196), (214, 200, 196)]), 10)
    d.rectangle((0, 0, W, hy), fill=wall)
    if rng.random() < 0.6:
        dx = _u(rng, 0, W - 30)
        d.rectangle((dx, hy - 0.32 * H, dx + 28, hy), fill=_muted(rng, (125, 95, 70)))
    if rng.random() < 0.6:
        wx = _u(rng, 0, W - 34)
        d.rectangle((wx, hy - 0.36 * H, wx + 34, hy - 0.2 * H), fill=(235, 235, 235))
        d.rectangle((wx + 3, hy - 0.36 * H + 3, wx + 31, hy - 0.2 * H - 3), fill=(178, 205, 225))
    d.rectangle((0, hy - 3, W, hy), fill=_shade(wall, 0.6))
    if rng.random() < 0.5:
        floor = _muted(rng, (150, 112, 75), 12)
        d.rectangle((0, hy, W, H), fill=floor)
        for ly in np.arange(hy + 8, H, 10):
            d.line((0, ly, W, ly), fill=_shade(floor, 0.85), width=1)
    else:
        floor = _muted(rng, (190, 190, 185), 10)
        d.rectangle((0, hy, W, H), fill=floor)
        for ly in np.arange(hy + 12, H, 16):
            d.line((0, ly, W, ly), fill=_shade(floor, 0.85), width=1)
        for lx in range(0, W, 22):
            d.line((lx, hy, lx + (lx - W / 2) * 0.8, H), fill=_shade(floor, 0.85), width=1)


def _bg_parking(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    d.rectangle((0, hy - 0.12 * H, W, hy), fill=_muted(rng, (150, 145, 140)))
    tar = _muted(rng, (82, 82, 86), 8)
    d.rectangle((0, hy, W, H), fill=tar)
    for cx in np.arange(_u(rng, -30, 0), W, 44):
        col = _muted(rng, _pick(rng, [(120, 125, 135), (150, 140, 130), (90, 95, 110), (170, 170, 165)]))
        d.rounded_rectangle((cx, hy - 16, cx + 38, hy + 8), radius=5, fill=col)
        d.rectangle((cx + 8, hy - 13, cx + 30, hy - 5), fill=(60, 70, 80))
        d.ellipse((cx + 4, hy + 3, cx + 12, hy + 11), fill=(25, 25, 25))
        d.ellipse((cx + 26, hy + 3, cx + 34, hy + 11), fill=(25, 25, 25))
    for lx in np.arange(_u(rng, -20, 0), W + 40, 34):
        d.line((lx, hy + 14, lx - 30, H), fill=(220, 220, 210), width=2)


def _bg_plaza(d, W, H, hy, rng):
    _sky(d, W, hy, rng)
    facade = _muted(rng, (200, 190, 170), 12)
    d.rectangle((0, hy - 0.3 * H, W, hy), fill=facade)
    for cx in np.arange(_u(rng, 0, 10), W, 20):
        d.rectangle((cx, hy - 0.28 * H, cx + 6, hy), fill=_shade(facade, 0.85))
    stone = _muted(rng, (185, 176, 160), 10)
    d.rectangle((0, hy, W, H), fill=stone)
    y, step = hy + 4.0, 5.0
    while y < H:
        d.line((0, y, W, y), fill=_shade(stone, 0.86), width=1)
        y, step = y + step, step * 1.25
    for lx in np.arange(-W, 2 * W, 24):
        d.line((W / 2 + (lx - W / 2) * 0.15, hy, lx, H), fill=_shade(stone, 0.86), width=1)


_BACKGROUNDS = {
    "street": _bg_street,
    "park": _bg_park,
    "indoor": _bg_indoor,
    "parking_lot": _bg_parking,
    "plaza": _bg_plaza,
}


def _extent(figs: list[_Fig], props: list[_Prop]) -> tuple[float, float, float, float]:
    pts = []
    for f in figs:
        pts += list(f.j.values())
        h = f.j["head"]
        pts += [h + np.array([dx, dy]) for dx, dy in ((R_HEAD, 0), (-R_HEAD, 0), (0, R_HEAD), (0, -R_HEAD))]
    for p in props:
        pts += [q + np.array(off) for q in p.pts for off in ((p.size, 0), (-p.size, 0), (0, p.size), (0, -p.size))]
    arr = np.array(pts)
    pad = 0.04  # limb half-widths and shoes
    return arr[:, 0].min() - pad, arr[:, 0].max() + pad, arr[:, 1].min() - pad, arr[:, 1].max() + pad


def render_image(spec: ImageSpec, seed: int, image_size: tuple[int, int] = (128, 64)) -> Image.Image:
    """Draw one image; its randomness comes only from (seed, spec.stream, spec.index)."""
    rng = np.random.default_rng([seed, spec.stream, spec.index])
    out_h, out_w = image_size
    H, W = out_h * _SUPERSAMPLE, out_w * _SUPERSAMPLE
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    hy = H * _u(rng, 0.4, 0.55)
    _BACKGROUNDS[spec.scene](d, W, H, hy, rng)

    figs, props, lift = _compose(spec.action, spec.appearance, spec.partner, rng)
    x0, x1, y0, y1 = _extent(figs, props)
    scale = H * _u(rng, 0.6, 0.8)  # pixels per body unit (a standing person is ~0.97 units)
    scale = min(scale, W * 0.94 / (x1 - x0), H * 0.9 / (y1 - y0 + lift))
    ground = H * _u(rng, 0.86, 0.96)
    ground = max(ground, H * 0.04 + (y1 - y0 + lift) * scale)
    ground = max(ground, hy + 6)
    room = W - (x1 - x0) * scale
    left = _u(rng, 0.03 * W, max(0.03 * W, room - 0.03 * W))
    ox, oy = left - x0 * scale, ground + (y0 - lift) * scale

    # Occasionally a small passer-by in the distance, so "two people" alone does not mean "abnormal".
    if rng.random() < 0.15:
        small = _compose(_pick(rng, ("standing", "walking")), sample_appearance(rng), None, rng)[0][0]
        if rng.random() < 0.5:
            small.mirror(0.0)
        s2 = scale * _u(rng, 0.25, 0.4)
        _draw_figure(_Painter(d, s2, _u(rng, 0.1, 0.9) * W, hy + _u(rng, 0.02, 0.12) * H + 0.5 * s2), small, rng)

    # Contact shadow: a darker patch of whatever ground is under the figure.
    gx = ox + scale * (x0 + x1) / 2
    shadow = _shade(img.getpixel((int(min(max(gx, 0), W - 1)), int(min(ground, H - 1)))), 0.7)
    half = (x1 - x0) * scale * 0.45
    d.ellipse((gx - half, ground - 3, gx + half, ground + 3), fill=shadow)

    pt = _Painter(d, scale, ox, oy)
    for f in figs:
        _draw_figure(pt, f, rng)
    for p in props:
        _draw_prop(pt, p, rng)

    img = img.reduce(_SUPERSAMPLE)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) * _u(rng, 0.88, 1.08)
    bank = _noise_bank(seed)
    start = int(rng.random() * (bank.size - arr.size))
    arr += bank[start : start + arr.size].reshape(arr.shape) * _u(rng, 2.0, 6.0)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


@functools.lru_cache(maxsize=4)
def _noise_bank(seed: int) -> np.ndarray:
    """Gaussian noise drawn once per seed; each image reads a window at a seeded offset.

    Drawing fresh normals for every image was a third of the rendering time."""
    return np.random.default_rng([seed, 777]).standard_normal(1 << 20, dtype=np.float32)


def _encode(img: Image.Image, seed: int, spec: ImageSpec) -> bytes:
    quality = 85 + (spec.index * 7 + seed) % 10  # varied compression, still a pure function of the spec
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _render_chunk(specs: list[ImageSpec], root: str, seed: int, image_size: tuple[int, int]) -> int:
    """Worker entry point: render and write a batch of images; returns how many were done."""
    base = Path(root)
    for spec in specs:
        data = _encode(render_image(spec, seed, image_size), seed, spec)
        for rel in spec.outputs:
            # Plain writes into folders made up front: the .complete marker, not per-file renames,
            # is what tells a finished set from a half-built one, and this saves ~2 syscalls a file.
            (base / rel).write_bytes(data)
    return len(specs)
