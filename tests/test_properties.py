"""Property-based tests (hypothesis) for the space and subnet parsers (issue 5, point 4).

Whatever the input — random JSON values, valid documents with one field mutated, random bytes in
a .json/.toml file — the parsers either return a valid object or raise ``UserError``; nothing else.
Whatever they accept satisfies the space's rules and survives a JSON round trip unchanged.
"""
from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnas_cli.errors import UserError
from qnas_cli.space import PRESETS, Arch, SearchSpace, load_arch, load_space, sample

# No example database: the tests must not write into the repository.
PROPS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FILES = settings(PROPS, max_examples=60)  # these write temporary files

scalars = (st.none() | st.booleans() | st.integers(-10, 300) | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=16)
spaces = st.sampled_from(sorted(PRESETS.values(), key=lambda s: s.name))


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """One random edit somewhere in a JSON document: replace, delete or add a value, or reshape a list."""
    doc = copy.deepcopy(doc)
    path: list[Any] = []
    node = doc
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):  # walk down a random path
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    edit = data.draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
    if not path:
        return data.draw(json_values) if edit == "replace" else doc
    key = path[-1]
    if edit == "replace":
        parent[key] = data.draw(json_values | st.sampled_from([0, -1, 1, 2, 3, 4, 7, 8, 12, 16, 20, True, 3.0, "3"]))
    elif edit == "delete":
        del parent[key]
    elif edit == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=10))] = data.draw(json_values)
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    return doc


def _assert_valid_arch(arch: Arch, space: SearchSpace) -> None:
    assert type(arch.resolution) is int and arch.resolution in space.resolutions
    assert len(arch.stages) == len(space.stages)
    for stage, spec in zip(arch.stages, space.stages):
        assert type(stage.width) is int and stage.width in spec.widths
        assert len(stage.blocks) in spec.depths
        for b in stage.blocks:
            assert type(b.kernel) is int and b.kernel in spec.kernels
            assert type(b.expand) is int and b.expand in spec.expands
    again = Arch.from_dict(json.loads(json.dumps(arch.to_dict(space))), space)
    assert again == arch and again.key == arch.key


def _assert_valid_space(space: SearchSpace) -> None:
    lists = [space.resolutions] + [v for st_ in space.stages for v in (st_.widths, st_.depths, st_.kernels, st_.expands)]
    for values in lists:
        assert values and all(type(v) is int and v > 0 for v in values) and len(set(values)) == len(values)
    assert all(k % 2 == 1 for st_ in space.stages for k in st_.kernels)
    assert space.stem_stride in (1, 2) and all(st_.stride in (1, 2) for st_ in space.stages)
    assert space.stem_channels > 0 and space.head_channels > 0 and space.feature_channels >= 0
    again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space and again.fingerprint == space.fingerprint


# ---- subnets ------------------------------------------------------------------------------------

def _parse_valid_or_refused(doc, space) -> None:
    """The documented contract: a valid subnet, or a one-line UserError."""
    try:
        arch = Arch.from_dict(doc, space)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
    else:
        _assert_valid_arch(arch, space)


@PROPS
@given(doc=json_values, space=spaces)
def test_any_json_value_is_a_subnet_or_a_user_error(doc, space):
    _parse_valid_or_refused(doc, space)


@PROPS
@given(space=spaces, seed=st.integers(0, 2**32), data=st.data())
def test_mutated_subnets_are_valid_or_refused(space, seed, data):
    doc = json.loads(json.dumps(sample(space, "random", random.Random(seed)).to_dict(space)))
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(doc, data)
    _parse_valid_or_refused(doc, space)


@PROPS
@given(space=spaces, seed=st.integers(0, 2**32))
def test_every_sampled_subnet_round_trips(space, seed):
    arch = sample(space, "random", random.Random(seed))
    _assert_valid_arch(arch, space)


@PROPS
@given(space=spaces, other=spaces, seed=st.integers(0, 2**32))
def test_a_subnet_of_another_space_is_refused(space, other, seed):
    doc = sample(other, "random", random.Random(seed)).to_dict(other)
    if other.fingerprint == space.fingerprint:
        _assert_valid_arch(Arch.from_dict(doc, space), space)
    else:
        with pytest.raises(UserError, match="belongs to space"):
            Arch.from_dict(doc, space)


# ---- spaces -------------------------------------------------------------------------------------

@PROPS
@given(doc=json_values)
def test_any_json_value_is_a_space_or_a_user_error(doc):
    if not isinstance(doc, dict):
        doc = {"stages": doc}
    try:
        space = SearchSpace.from_dict(doc)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
    else:
        _assert_valid_space(space)


@PROPS
@given(space=spaces, data=st.data())
def test_mutated_spaces_are_valid_or_refused(space, data):
    doc = json.loads(json.dumps(space.to_dict()))
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(doc, data)
    try:
        got = SearchSpace.from_dict(doc) if isinstance(doc, dict) else None
    except UserError as e:
        assert str(e) and "\n" not in str(e)
    else:
        if got is not None:
            _assert_valid_space(got)


choices = lambda lo, hi: st.lists(st.integers(lo, hi), min_size=1, max_size=3, unique=True)  # noqa: E731
stage_docs = st.fixed_dictionaries({"widths": choices(1, 64), "depths": choices(1, 4),
                                    "kernels": choices(0, 4).map(lambda ks: [2 * k + 1 for k in ks]),
                                    "expands": choices(1, 6), "stride": st.sampled_from([1, 2])})
space_docs = st.fixed_dictionaries({"resolutions": choices(8, 64), "stem_channels": st.integers(1, 32),
                                    "stem_stride": st.sampled_from([1, 2]), "stages": st.lists(stage_docs, min_size=1, max_size=4),
                                    "head_channels": st.integers(1, 64), "feature_channels": st.integers(0, 64)})


@FILES
@given(doc=space_docs, seed=st.integers(0, 2**32))
def test_legal_space_files_load_and_their_subnets_round_trip(doc, seed):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "space.json"
        path.write_text(json.dumps(doc))
        space = load_space(path)
        _assert_valid_space(space)
        sub = Path(d) / "subnet.json"
        arch = sample(space, "random", random.Random(seed))
        sub.write_text(json.dumps(arch.to_dict(space)))
        assert load_arch(sub, space) == arch


@FILES
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode), suffix=st.sampled_from([".json", ".toml"]),
       deep=st.integers(0, 3))
def test_random_bytes_in_a_file_are_refused_cleanly(raw, suffix, deep):
    if deep:  # nesting deep enough to break a recursive parser
        raw = b"a = " * (suffix == ".toml") + b"[" * 10 ** (deep + 2) + raw
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x{suffix}"
        path.write_bytes(raw)
        for parse in (load_space, lambda p: load_arch(p, PRESETS["tiny"])):
            try:
                parse(path)
            except UserError as e:
                assert str(e) and "\n" not in str(e).strip()
