"""The plan of a demo set: who appears in which image doing what, captions, hard negatives, twins.

All of it is drawn in the main process from seeded generators, before any image is rendered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tpas.demo.captions import _source_caption, make_caption
from tpas.demo.sampling import (
    _other_action,
    _partner_for,
    _pick,
    _vary,
    sample_appearance,
)
from tpas.demo.vocabulary import (
    _VARIATION_MENTION,
    ABNORMAL_ACTIONS,
    ACTIONS,
    NORMAL_ACTIONS,
    SCENES,
    TWO_PERSON_ACTIONS,
    Appearance,
    ImageSpec,
)

SHARD_SIZE = 2500  # records per annotation shard and images per train/imgs_<k> folder, as in PAB
_STREAM_TRAIN, _STREAM_TEST, _STREAM_DISTRACTOR = 0, 1, 2


@dataclass
class _Shot:
    """A planned image plus the bookkeeping the annotation writers need."""

    person: str
    appearance: Appearance
    action: str
    scene: str
    partner: Appearance | None
    extra: dict = field(default_factory=dict)
    must: set = field(default_factory=set)


def _appearance_fields(app: Appearance) -> dict:
    return dict(vars(app))  # flat dataclass: much faster than asdict's deep copy


def _plan_train(seed: int, n_train: int) -> tuple[list[dict], list[ImageSpec], dict]:
    """People in "videos": one identity doing 2-4 actions (1-2 normal, 1-2 abnormal)."""
    rng = np.random.default_rng([seed, 101])
    cap_rng = np.random.default_rng([seed, 102])
    shots: list[tuple[_Shot, int, int]] = []  # (shot, video, y)
    video_captions: dict[tuple[int, int], str] = {}
    video = 0
    while len(shots) < n_train:
        app = sample_appearance(rng)
        scene = _pick(rng, SCENES)
        # 1-2 normal and 1-2 abnormal actions; P(2)=0.4 each keeps the split near 50/50.
        normals = [NORMAL_ACTIONS[i] for i in rng.permutation(len(NORMAL_ACTIONS))[: 1 + int(rng.random() < 0.4)]]
        abnormals = [ABNORMAL_ACTIONS[i] for i in rng.permutation(len(ABNORMAL_ACTIONS))[: 1 + int(rng.random() < 0.4)]]
        items = [(a, 0) for a in normals] + [(a, 1 + k) for k, a in enumerate(abnormals)]
        items = items[: n_train - len(shots)]
        person = f"p{video:06d}"
        for action, y in items:
            partner = _partner_for(app, rng) if action in TWO_PERSON_ACTIONS else None
            shots.append((_Shot(person, app, action, scene, partner), video, y))
        # One source ("video") caption per (video, y): y=0 covers the normal part of the clip.
        for y in sorted({y for _, y in items}):
            video_captions[(video, y)] = _source_caption([a for a, yy in items if yy == y], scene)
        video += 1

    captions = [make_caption(s.appearance, s.action, s.scene, cap_rng) for s, _, _ in shots]
    paths, ids = [], []
    for g, (s, _, _) in enumerate(shots):
        k, line = divmod(g, SHARD_SIZE)
        paths.append(f"train/imgs_{k}/{'goal' if s.action in NORMAL_ACTIONS else 'wentrong'}/{line}.jpg")
        ids.append(f"{k}_{line}")

    # Hard negatives: the same person in another action (preferably of the other normality), or
    # a similar-looking person (same top) doing the same action.
    by_video: dict[int, list[int]] = {}
    by_look: dict[tuple, list[int]] = {}
    by_action: dict[str, list[int]] = {}
    for g, (s, v, _) in enumerate(shots):
        by_video.setdefault(v, []).append(g)
        by_look.setdefault((s.action, s.appearance.top_colour, s.appearance.top_type), []).append(g)
        by_look.setdefault((s.action, s.appearance.top_colour), []).append(g)
        by_action.setdefault(s.action, []).append(g)
    hard_rng = np.random.default_rng([seed, 103])
    records, specs = [], []
    for g, (s, v, y) in enumerate(shots):
        same_person = [h for h in by_video[v] if shots[h][0].action != s.action]
        abnormal = s.action in ABNORMAL_ACTIONS
        flipped = [h for h in same_person if (shots[h][0].action in ABNORMAL_ACTIONS) != abnormal]
        hard = None
        if same_person and hard_rng.random() < 0.7:
            hard = _pick(hard_rng, flipped or same_person)
        else:
            look = s.appearance
            for key in ((s.action, look.top_colour, look.top_type), (s.action, look.top_colour)):
                pool = [h for h in by_look[key] if shots[h][1] != v]
                if pool:
                    hard = _pick(hard_rng, pool)
                    break
            if hard is None:
                pool = (
                    same_person
                    or [h for h in by_action[s.action] if shots[h][1] != v]
                    or [h for h in range(len(shots)) if h != g]
                )
                hard = _pick(hard_rng, pool) if pool else g
        records.append(
            {
                "image": paths[g],
                "caption": captions[g],
                "image_id": ids[g],
                "hard_i": paths[hard],
                "hard_c": captions[hard],
                "hard_i_id": ids[hard],
                "source_id": f"{v}_{y}",
                "source_caption": video_captions[(v, y)],
                "_action": s.action,
                "_scene": s.scene,
            }
        )
        specs.append(ImageSpec(_STREAM_TRAIN, g, s.person, s.appearance, s.action, s.scene, s.partner, (paths[g],)))
    n_abnormal = sum(1 for s, _, _ in shots if s.action in ABNORMAL_ACTIONS)
    stats = {"n_videos": video, "n_train_normal": len(shots) - n_abnormal, "n_train_abnormal": n_abnormal}
    attrs = [
        {
            "image": paths[g],
            "split": "train",
            "person": s.person,
            "video": v,
            "action": s.action,
            "abnormal": s.action in ABNORMAL_ACTIONS,
            "scene": s.scene,
            **_appearance_fields(s.appearance),
            "partner": None if s.partner is None else _appearance_fields(s.partner),
        }
        for g, (s, v, _) in enumerate(shots)
    ]
    stats["attributes"] = attrs
    return records, specs, stats


def _plan_test(seed: int, n_test: int, n_distractors: int) -> tuple[list[_Shot], list[_Shot]]:
    """Query images (about half in near-twin groups) and distractor gallery images."""
    rng = np.random.default_rng([seed, 201])
    queries: list[_Shot] = []
    actions_of: dict[str, set[str]] = {}
    n_people = 0

    def new_person() -> str:
        nonlocal n_people
        n_people += 1
        return f"t{n_people - 1:06d}"  # "t" prefix: test people never share an id with train ("p")

    def variant(base: _Shot, kind: str) -> _Shot | None:
        if kind == "same_person":
            act = _other_action(rng, actions_of[base.person], base.action)
            if act is None:
                return None
            partner = _partner_for(base.appearance, rng) if act in TWO_PERSON_ACTIONS else None
            shot = _Shot(base.person, base.appearance, act, base.scene, partner, {"twin_kind": kind})
        else:
            attr = _pick(rng, ("top_colour", "bottom_colour", "top_type", "hair_colour"), (0.55, 0.25, 0.1, 0.1))
            app = _vary(base.appearance, attr, rng)
            scene = base.scene if rng.random() < 0.5 else _pick(rng, SCENES)
            partner = _partner_for(app, rng) if base.action in TWO_PERSON_ACTIONS else None
            shot = _Shot(new_person(), app, base.action, scene, partner, {"twin_kind": kind, "differs_in": attr})
            base.must.add(_VARIATION_MENTION[attr])
            shot.must.add(_VARIATION_MENTION[attr])
        actions_of.setdefault(shot.person, set()).add(shot.action)
        return shot

    group = 0
    while len(queries) < n_test:
        # P(single)=0.71 with groups of 2-3 puts about half of the query images in twin groups.
        size = 1 if rng.random() < 0.71 else 2 + int(rng.random() < 0.5)
        size = min(size, n_test - len(queries))
        app = sample_appearance(rng)
        action = _pick(rng, ACTIONS)
        partner = _partner_for(app, rng) if action in TWO_PERSON_ACTIONS else None
        base = _Shot(
            new_person(),
            app,
            action,
            _pick(rng, SCENES),
            partner,
            {"twin_group": group, "twin_kind": "single" if size == 1 else "base"},
        )
        actions_of[base.person] = {action}
        members = [base]
        while len(members) < size:
            twin = variant(base, _pick(rng, ("same_person", "look_alike")))
            if twin is None:
                break
            twin.extra["twin_group"] = group
            members.append(twin)
        for m in members[1:]:  # every member of a group must state what separates the group
            m.must |= base.must
        queries += members
        group += 1

    distractors: list[_Shot] = []
    for _ in range(n_distractors):
        if queries and rng.random() < 0.6:
            q = queries[int(rng.integers(len(queries)))]
            twin = variant(q, _pick(rng, ("same_person", "look_alike")))
            if twin is not None:
                twin.extra["twin_of_group"] = q.extra["twin_group"]
                twin.must = set()
                distractors.append(twin)
                continue
        app = sample_appearance(rng)
        action = _pick(rng, ACTIONS)
        partner = _partner_for(app, rng) if action in TWO_PERSON_ACTIONS else None
        shot = _Shot(new_person(), app, action, _pick(rng, SCENES), partner, {"twin_kind": "unrelated"})
        actions_of[shot.person] = {action}
        distractors.append(shot)
    return queries, distractors
