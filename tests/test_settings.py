"""The one config reader (protlm.settings): keys, types, choices, nesting, --set and override."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

import protlm
from protlm.errors import ConfigError
from protlm.settings import apply, build, override, parse_sets, plain
from protlm.train import load_config


@dataclass
class Inner:
    rate: float = 0.5
    mode: Literal["fast", "exact"] = "fast"


@dataclass
class Item:
    name: str
    size: int = 1


@dataclass
class Outer:
    steps: int = 10
    label: str | None = None
    paths: list[str] = field(default_factory=list)
    rates: tuple[float, ...] = (0.1,)
    pair: tuple[float, float] = (0.0, 1.0)
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Inner] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)


def _error(cls, data, source="f.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        build(cls, data, source)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unknown_key_names_the_key_the_file_and_a_close_spelling(tmp_path):
    assert _error(Outer, {"stpes": 3}) == "f.yaml: unknown config key 'stpes' (did you mean 'steps'?)"
    assert _error(Outer, {"inner": {"rtae": 1}}) == "f.yaml: unknown config key 'inner.rtae' (did you mean 'inner.rate'?)"
    assert _error(Outer, {"zzz": 1}) == "f.yaml: unknown config key 'zzz'"
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {train: [x.fa]}\nrun: {stesp: 3}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown config key 'run\.stesp' \(did you mean 'run\.steps'\?\)$"):
        load_config(path)


def test_wrong_types_name_the_key():
    assert _error(Outer, {"steps": "10"}) == "f.yaml: steps must be int, got '10'"
    assert _error(Outer, {"steps": True}) == "f.yaml: steps must be int, got True"
    assert _error(Outer, {"inner": {"rate": "fast"}}) == "f.yaml: inner.rate must be float, got 'fast'"
    assert _error(Outer, {"label": 3}) == "f.yaml: label must be str | None, got 3"
    assert _error(Outer, {"inner": 3}) == "f.yaml: inner must be a mapping, got int"
    assert _error(Item, {}) == "f.yaml: name is required"
    cfg = build(Outer, {"inner": {"rate": 1}, "label": None}, "f.yaml")
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)  # float fields take ints, as floats
    assert build(Inner, {"rate": "1e-3"}, "f").rate == 1e-3  # YAML 1.1 reads 1e-3 as a string


def test_literal_choices_are_checked_and_listed():
    assert _error(Outer, {"inner": {"mode": "quick"}}) == "f.yaml: inner.mode must be one of fast, exact, got 'quick'"
    assert build(Inner, {"mode": "exact"}, "f").mode == "exact"
    with pytest.raises(ConfigError, match=r"optim\.schedule must be one of rsqrt, cosine, constant, got 'linear'"):
        load_config(None, ["data.train=[x.fa]", "optim.schedule=linear"])


def test_nested_sections_lists_and_maps():
    cfg = build(Outer, {"inner": {"mode": "exact"}, "sections": {"a": {"rate": 0.2}}, "items": [{"name": "x", "size": 2}],
                        "extra": {"anything": [1, {"b": 2}]}}, "f")
    assert cfg.inner == Inner(0.5, "exact") and cfg.sections == {"a": Inner(0.2)} and cfg.items == [Item("x", 2)]
    assert cfg.extra == {"anything": [1, {"b": 2}]}
    assert build(Outer, {"inner": None, "sections": None}, "f") == Outer()  # an empty section is the defaults
    # a named section in a list is called by its name, as --set addresses it
    assert _error(Outer, {"items": [{"name": "x", "size": "big"}]}) == "f.yaml: items.x.size must be int, got 'big'"
    assert _error(Outer, {"sections": {"a": {"mode": 1}}}) == "f.yaml: sections.a.mode must be one of fast, exact, got 1"
    # a round trip through plain data gives the same config
    assert build(Outer, plain(cfg), "f") == cfg


def test_list_and_tuple_types():
    cfg = build(Outer, {"paths": "one.fa", "rates": [0.2, 1], "pair": [0.3, 0.7]}, "f")
    assert cfg.paths == ["one.fa"]  # a single path where a list is expected
    assert cfg.rates == (0.2, 1.0) and cfg.pair == (0.3, 0.7)
    assert _error(Outer, {"paths": ["a", 2]}) == "f.yaml: paths[1] must be str, got 2"
    assert _error(Outer, {"rates": 0.2}) == "f.yaml: rates must be tuple[float, ...], got 0.2"
    assert _error(Outer, {"pair": [0.1]}) == "f.yaml: pair must be tuple[float, float], got [0.1]"


def test_set_values_are_yaml():
    assert parse_sets(["run.precision=fp32", "objective.rates=[0.15,0.2]", "a.b=1e-3", "x=", "flag=true",
                       "m={k: v}", "path=a=b"]) == {
        "run.precision": "fp32", "objective.rates": [0.15, 0.2], "a.b": "1e-3", "x": "", "flag": True,
        "m": {"k": "v"}, "path": "a=b"}
    changes = parse_sets(["a.b=1", "a={b: 2}", "a.b=3"])  # the last value of a key wins, applied last
    assert list(changes.items()) == [("a", {"b": 2}), ("a.b", 3)]
    with pytest.raises(ConfigError, match=r"^--set 'run\.steps': expected key=value$"):
        parse_sets(["run.steps"])
    with pytest.raises(ConfigError, match=r"^--set a: cannot parse value '\[1'$"):
        parse_sets(["a=[1"])


def test_override_returns_a_new_checked_config():
    cfg = Outer(items=[Item("x")])
    new = override(cfg, {"inner.mode": "exact", "steps": 3, "extra.k.with.dots": 1, "sections.s.rate": 0.1,
                         "items.x.size": 5})
    assert new.inner.mode == "exact" and new.steps == 3 and new.extra == {"k.with.dots": 1}
    assert new.sections == {"s": Inner(rate=0.1)} and new.items == [Item("x", 5)]
    assert cfg == Outer(items=[Item("x")])  # the original is untouched
    with pytest.raises(ConfigError, match=r"^variant A: unknown config key 'inner\.mdoe' \(did you mean 'inner\.mode'\?\)$"):
        override(cfg, {"inner.mdoe": "exact"}, "variant A")
    with pytest.raises(ConfigError, match=r"^override: unknown config key 'innr' \(did you mean 'inner'\?\)$"):
        override(cfg, {"innr.mode": "exact"})
    with pytest.raises(ConfigError, match=r"^override: inner\.mode must be one of fast, exact, got 'slow'$"):
        override(cfg, {"inner.mode": "slow"})
    with pytest.raises(ConfigError, match=r"^override: steps\.x: steps is not a section$"):
        override(cfg, {"steps.x": 1})
    with pytest.raises(ConfigError, match=r"^override: items\.y\.size: items has no entry named 'y'$"):
        override(cfg, {"items.y.size": 1})


def test_override_of_a_training_config_needs_no_strings():
    cfg = load_config(None, ["data.train=[x.fa]"])
    new = override(cfg, {"objective.mask_rates": [0.2], "run.seed": 3, "model.overrides.d_model": 96})
    assert new.objective.mask_rates == (0.2,) and new.run.seed == 3 and new.model.overrides == {"d_model": 96}
    assert cfg.run.seed == 0 and cfg.objective.mask_rates == (0.15, 0.2, 0.3)
    assert new == load_config(None, ["data.train=[x.fa]", "objective.mask_rates=[0.2]", "run.seed=3",
                                     "model.overrides.d_model=96"])


def test_apply_edits_raw_data_along_the_schema():
    data = {"items": [{"name": "x"}]}
    apply(data, {"inner.rate": 0.2, "items.x.size": 4, "extra.a.b": 1}, Outer)
    assert data == {"items": [{"name": "x", "size": 4}], "inner": {"rate": 0.2}, "extra": {"a.b": 1}}
    with pytest.raises(ConfigError, match=r"^--set: unknown config key 'inner\.rat' \(did you mean 'inner\.rate'\?\)$"):
        apply(data, {"inner.rat": 1}, Outer)


def test_the_reader_is_layer_one():
    path = os.path.join(os.path.dirname(protlm.__file__), "settings.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m.startswith("protlm")} <= {"protlm.errors"}
