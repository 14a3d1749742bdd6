"""Search spaces and subnet files: presets, parsing, validation with one-line errors."""
from __future__ import annotations

import json
import random

import pytest

from qnas_cli.errors import UserError
from qnas_cli.space import PRESETS, Arch, SearchSpace, load_arch, load_space, sample


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_sample_and_round_trip(name):
    space = PRESETS[name]
    for how in ("largest", "smallest", "random"):
        arch = sample(space, how, random.Random(1))
        again = Arch.from_dict(json.loads(json.dumps(arch.to_dict(space))), space)
        assert again == arch and again.key == arch.key


def test_largest_and_smallest_are_extremes():
    space = PRESETS["small"]
    big, small = sample(space, "largest"), sample(space, "smallest")
    assert big.resolution == max(space.resolutions) and small.resolution == min(space.resolutions)
    for st, spec in zip(big.stages, space.stages):
        assert st.width == max(spec.widths) and len(st.blocks) == max(spec.depths)
        assert all(b.kernel == max(spec.kernels) and b.expand == max(spec.expands) for b in st.blocks)


def test_random_sampling_is_seeded():
    space = PRESETS["small"]
    a = [sample(space, "random", random.Random(7)).key for _ in range(2)]
    assert a[0] == a[1]
    assert len({sample(space, "random", random.Random(s)).key for s in range(20)}) > 10


def _good(space_name="small"):
    space = PRESETS[space_name]
    return space, sample(space, "largest").to_dict(space)


@pytest.mark.parametrize("mutate, field, legal", [
    (lambda d: d.update(resolution=30), "subnet.resolution", "24, 28, 32"),
    (lambda d: d["stages"][1].update(width=33), "subnet.stages[1].width", "24, 32"),
    (lambda d: d["stages"][0]["blocks"][0].update(kernel=4), "subnet.stages[0].blocks[0].kernel", "3, 5, 7"),
    (lambda d: d["stages"][2]["blocks"][1].update(expand=5), "subnet.stages[2].blocks[1].expand", "3, 4, 6"),
    (lambda d: d["stages"][1]["blocks"].append({"kernel": 3, "expand": 3}), "subnet.stages[1].depth", "2, 3"),
])
def test_bad_subnet_names_field_value_and_legal_values(mutate, field, legal):
    space, d = _good()
    mutate(d)
    with pytest.raises(UserError) as e:
        Arch.from_dict(d, space)
    msg = str(e.value)
    assert field in msg and legal in msg and "\n" not in msg


def test_subnet_from_another_space_is_refused():
    _, d = _good("tiny")
    with pytest.raises(UserError, match="belongs to space 'tiny'"):
        Arch.from_dict(d, PRESETS["small"])


def test_space_files_json_and_toml(tmp_path):
    d = PRESETS["tiny"].to_dict()
    (tmp_path / "s.json").write_text(json.dumps(d))
    toml = ["name = 'mine'", "resolutions = [16, 20]", "stem_channels = 8", "stem_stride = 2", "head_channels = 32"]
    for st in d["stages"]:
        toml += ["[[stages]]"] + [f"{k} = {list(v) if isinstance(v, (list, tuple)) else v}" for k, v in st.items()]
    (tmp_path / "s.toml").write_text("\n".join(toml))
    a, b = load_space(tmp_path / "s.json"), load_space(tmp_path / "s.toml")
    assert a.fingerprint == b.fingerprint == PRESETS["tiny"].fingerprint


@pytest.mark.parametrize("change, words", [
    (lambda d: d["stages"][0].update(widths=[-8, 12]), "not a positive integer"),
    (lambda d: d["stages"][0].update(kernels=[3, 4]), "even"),
    (lambda d: d["stages"][1].update(depths=[]), "empty"),
    (lambda d: d.update(stem_stride=3), "stem_stride"),
    (lambda d: d["stages"][0].update(widths="wide"), "expected a list"),
    (lambda d: d.update(colour="red"), "unknown field 'colour'"),
    (lambda d: d.pop("head_channels"), "missing field 'head_channels'"),
])
def test_impossible_spaces_are_refused(tmp_path, change, words):
    d = json.loads(json.dumps(PRESETS["tiny"].to_dict()))
    change(d)
    with pytest.raises(UserError, match=words):
        SearchSpace.from_dict(d)


def test_unreadable_subnet_files(tmp_path):
    space = PRESETS["small"]
    with pytest.raises(UserError, match="does not exist"):
        load_arch(tmp_path / "nope.json", space)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_arch(tmp_path / "bad.json", space)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="object"):
        load_arch(tmp_path / "list.json", space)
