"""Figure geometry: body proportions, posed skeletons (`_Fig`), props, and one composition per action.

Body frame: y up, units of standing height, origin at the hip centre. Limb angles are degrees
from straight down, positive towards the facing direction (+x). Nothing here touches pixels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tpas.demo.sampling import _pick
from tpas.demo.vocabulary import _BUILD_WIDTH, Appearance

L_THIGH, L_SHIN, L_TORSO, L_NECK, R_HEAD = 0.245, 0.235, 0.30, 0.03, 0.068
L_UARM, L_FARM = 0.165, 0.15
W_LEG, W_ARM = 0.072, 0.05


def _d(theta: float) -> np.ndarray:
    t = math.radians(theta)
    return np.array([math.sin(t), -math.cos(t)])


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([v[0] * c - v[1] * s, v[0] * s + v[1] * c])


def _ik(sh: np.ndarray, target: np.ndarray, bend: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-link arm reaching for `target`; `bend` (+1/-1) picks the elbow side."""
    v = target - sh
    dist = float(np.hypot(*v)) or 1e-6
    u = v / dist
    dist = min(max(dist, abs(L_UARM - L_FARM) + 1e-3), (L_UARM + L_FARM) * 0.999)
    cos_a = (L_UARM**2 + dist**2 - L_FARM**2) / (2 * L_UARM * dist)
    a = math.degrees(math.acos(max(-1.0, min(1.0, cos_a))))
    elbow = sh + L_UARM * _rot(u, bend * a)
    return elbow, sh + u * dist


@dataclass
class _Fig:
    """A posed figure: joint positions (index 0 = far/screen-left limb, 1 = near/screen-right)."""

    app: Appearance
    view: str  # "front" or "side"
    j: dict[str, np.ndarray]
    fwd: np.ndarray  # facing direction (side view); rotated with the figure

    def transform(self, fn: Callable[[np.ndarray], np.ndarray], vec_fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.j = {k: fn(v) for k, v in self.j.items()}
        self.fwd = vec_fn(self.fwd)

    def mirror(self, x0: float) -> None:
        self.transform(lambda p: np.array([2 * x0 - p[0], p[1]]), lambda v: np.array([-v[0], v[1]]))

    def rotate(self, deg: float, c: np.ndarray) -> None:
        self.transform(lambda p: c + _rot(p - c, deg), lambda v: _rot(v, deg))

    def shift(self, dx: float, dy: float = 0.0) -> None:
        self.transform(lambda p: p + np.array([dx, dy]), lambda v: v)


def _frame(tau: float, nu: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    up = np.array([math.sin(math.radians(tau)), math.cos(math.radians(tau))])
    perp = np.array([up[1], -up[0]])  # towards the front for a side view
    neck = L_TORSO * up
    head = neck + (L_NECK + R_HEAD) * np.array([math.sin(math.radians(tau + nu)), math.cos(math.radians(tau + nu))])
    return up, perp, neck, head


def _shoulder(app: Appearance, view: str, tau: float, i: int) -> np.ndarray:
    up, perp, neck, _ = _frame(tau)
    off = (0.085 * _BUILD_WIDTH[app.build]) if view == "front" else 0.012
    return neck - up * 0.03 + perp * (off if i else -off)


def _figure(app: Appearance, view: str, tau: float, arms: Sequence, legs: Sequence, nu: float = 0.0) -> _Fig:
    """Pose a figure. An arm is ("a", upper, fore) in angles or ("t", point, bend) for a reach target;
    a leg is (thigh, shin) in angles."""
    _, perp, neck, head = _frame(tau, nu)
    hip = np.zeros(2)
    hip_off = 0.045 * _BUILD_WIDTH[app.build] if view == "front" else 0.01
    j = {"hip": hip, "neck": neck, "head": head}
    for i in (0, 1):
        sh = _shoulder(app, view, tau, i)
        spec = arms[i]
        if spec[0] == "a":
            el = sh + L_UARM * _d(spec[1])
            ha = el + L_FARM * _d(spec[2])
        else:
            el, ha = _ik(sh, np.asarray(spec[1], dtype=float), spec[2])
        hp = hip + perp * (hip_off if i else -hip_off)
        kn = hp + L_THIGH * _d(legs[i][0])
        ft = kn + L_SHIN * _d(legs[i][1])
        j.update({f"sh{i}": sh, f"el{i}": el, f"ha{i}": ha, f"hp{i}": hp, f"kn{i}": kn, f"ft{i}": ft})
    return _Fig(app=app, view=view, j=j, fwd=np.array([1.0, 0.0]))


@dataclass
class _Prop:
    kind: str  # "ball", "stick", "impact"
    pts: list[np.ndarray]
    size: float


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()  # rng.random() is several times cheaper than rng.uniform()


def _compose(
    action: str, app: Appearance, partner: Appearance | None, rng: np.random.Generator
) -> tuple[list[_Fig], list[_Prop], float]:
    """Pose the subject (first figure) and, for two-person actions, the other person.

    Returns figures, props and how far (body units) the group floats above the ground."""
    u = functools.partial(_u, rng)
    props: list[_Prop] = []
    lift = 0.0
    if action == "standing":
        figs = [
            _figure(
                app,
                "front",
                u(-2, 2),
                [("a", u(-12, -5), u(-8, 0)), ("a", u(5, 12), u(0, 8))],
                [(u(-5, -2), u(-3, 0)), (u(2, 5), u(0, 3))],
            )
        ]
    elif action == "waving":
        up_arm = ("a", u(115, 145), u(160, 200))
        down_arm = ("a", u(-12, -5), u(-8, 0))
        if rng.random() < 0.5:
            arms = [down_arm, up_arm]
        else:  # mirror: the screen-left arm waves
            arms = [("a", -up_arm[1], -up_arm[2]), ("a", -down_arm[1], -down_arm[2])]
        figs = [_figure(app, "front", u(-3, 3), arms, [(u(-5, -2), u(-3, 0)), (u(2, 5), u(0, 3))])]
    elif action == "walking":
        amp = u(18, 28)
        fwd_leg, back_leg = (amp, amp * 0.2), (-amp * 0.8, -amp * 1.7)
        back_arm, fwd_arm = ("a", -amp * 0.9, -amp * 0.5), ("a", amp * 0.9, amp * 1.6)
        near_fwd = rng.random() < 0.5
        legs = [back_leg, fwd_leg] if near_fwd else [fwd_leg, back_leg]
        arms = [fwd_arm, back_arm] if near_fwd else [back_arm, fwd_arm]
        figs = [_figure(app, "side", u(0, 5), arms, legs)]
    elif action == "running":
        fwd_leg, back_leg = (u(55, 72), u(-12, 5)), (u(-38, -25), u(-105, -80))
        fwd_arm, back_arm = ("a", u(40, 60), u(125, 150)), ("a", u(-60, -40), u(20, 45))
        near_fwd = rng.random() < 0.5
        legs = [back_leg, fwd_leg] if near_fwd else [fwd_leg, back_leg]
        arms = [fwd_arm, back_arm] if near_fwd else [back_arm, fwd_arm]
        figs = [_figure(app, "side", u(12, 20), arms, legs)]
        lift = u(0.02, 0.06)
    elif action == "playing_football":
        arms = [("a", u(50, 70), u(70, 95)), ("a", u(-75, -50), u(-65, -40))]
        if rng.random() < 0.6:  # follow-through, ball leaving the foot
            fig = _figure(app, "side", u(-10, -3), arms, [(u(-8, 0), u(-6, 0)), (u(40, 58), u(62, 85))])
            ball = fig.j["ft1"] + np.array([0.09, u(-0.01, 0.04)])
        else:  # wind-up, ball on the ground in front of the standing foot
            fig = _figure(app, "side", u(0, 6), arms, [(u(0, 8), u(-2, 4)), (u(-40, -25), u(-90, -65))])
            ball = np.array([fig.j["ft0"][0] + u(0.1, 0.16), fig.j["ft0"][1] + 0.055])
        props.append(_Prop("ball", [ball], 0.058))
        figs = [fig]
    elif action == "lying":
        bent = rng.random() < 0.35
        near_leg = (u(35, 55), u(-25, -5)) if bent else (u(0, 12), u(0, 8))
        fig = _figure(
            app,
            "side",
            0.0,
            [("a", u(-40, -15), u(-60, -20)), ("a", u(120, 170), u(140, 185))],
            [(u(-12, 0), u(-10, 0)), near_leg],
        )
        fig.rotate(_pick(rng, (-1, 1)) * u(84, 96), np.zeros(2))
        figs = [fig]
    elif action == "falling":
        fig = _figure(
            app,
            "side",
            0.0,
            [("a", u(95, 130), u(60, 110)), ("a", u(135, 170), u(160, 210))],
            [(u(-10, 8), u(-12, 5)), (u(40, 70), u(15, 50))],
        )
        fig.rotate(_pick(rng, (-1, 1)) * u(38, 55), np.zeros(2))
        figs = [fig]
        lift = u(0.0, 0.08)
    elif action == "crouching_in_pain":
        tau = u(45, 62)
        up, perp, _, _ = _frame(tau)
        belly = up * u(0.07, 0.13) + perp * 0.07
        th, sh_ = u(70, 85), u(-32, -15)
        figs = [
            _figure(
                app,
                "side",
                tau,
                [("t", belly + np.array([0.0, 0.02]), 1), ("t", belly, 1)],
                [(th - 6, sh_ - 4), (th, sh_)],
                nu=u(10, 28),
            )
        ]
    elif action == "being_hit":
        assert partner is not None
        v_tau, v_nu = u(-32, -20), u(-30, -15)
        victim = _figure(
            app,
            "side",
            v_tau,
            [("a", u(-150, -115), u(-180, -135)), ("a", u(-100, -60), u(-60, -20))],
            [(u(-20, -8), u(-35, -20)), (u(15, 28), u(-10, 0))],
            nu=v_nu,
        )
        head = victim.j["head"]
        contact = head + np.array([R_HEAD * 0.9, u(-0.01, 0.02)])
        a_tau = u(18, 28)
        sh = _shoulder(partner, "side", a_tau, 1)
        if rng.random() < 0.5:  # punch: near arm nearly straight, fist on the victim's head
            reach = (L_UARM + L_FARM) * 0.95
            dy = contact[1] - sh[1]
            dist = contact[0] + sh[0] + math.sqrt(max(reach**2 - dy**2, 0.0))
            target = np.array([dist - contact[0], contact[1]])
            attacker = _figure(
                partner,
                "side",
                a_tau,
                [("t", _frame(a_tau)[3] + np.array([0.09, -0.05]), -1), ("t", target, -1)],
                [(u(-32, -20), u(-15, -5)), (u(25, 38), u(0, 10))],
            )
        else:  # club swung down onto the head
            hand = sh + 0.29 * _d(u(115, 140))
            stick = 0.3
            dy = contact[1] - hand[1]
            dist = contact[0] + hand[0] + math.sqrt(max(stick**2 - dy**2, 0.0))
            attacker = _figure(
                partner,
                "side",
                a_tau,
                [("t", _frame(a_tau)[3] + np.array([0.09, -0.05]), -1), ("t", hand, 1)],
                [(u(-32, -20), u(-15, -5)), (u(25, 38), u(0, 10))],
            )
            hand_world = np.array([dist - attacker.j["ha1"][0], attacker.j["ha1"][1]])
            props.append(_Prop("stick", [hand_world, contact], 0.03))
        attacker.mirror(0.0)
        attacker.shift(dist)
        props.append(_Prop("impact", [contact + np.array([0.0, 0.02])], 0.06))
        figs = [attacker, victim]
    elif action == "fighting":
        assert partner is not None
        gap = u(0.46, 0.54)
        puncher = int(rng.integers(3))  # 0/1: that fighter throws a punch, 2: both on guard

        def fighter(a: Appearance, punch: bool) -> _Fig:
            tau = u(2, 10)
            head = _frame(tau)[3]
            if punch:  # reach for the opponent, who stands `gap` away
                near = ("t", np.array([gap, head[1] + u(-0.1, 0.0)]), -1)
            else:
                near = ("t", head + np.array([0.1, -0.06]), -1)
            return _figure(
                a,
                "side",
                tau,
                [("t", head + np.array([0.08, -0.02]), -1), near],
                [(u(-28, -16), u(-12, -2)), (u(12, 24), u(-5, 5))],
            )

        subject, other = fighter(app, puncher == 0), fighter(partner, puncher == 1)
        other.mirror(0.0)
        other.shift(gap)
        figs = [other, subject]
    else:
        raise ValueError(f"unknown action {action!r}")
    return figs, props, lift
