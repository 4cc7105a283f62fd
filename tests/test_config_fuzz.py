"""Config validation fuzzing (issue 10): random wrong types and values never escape `validate` as anything but
a one-line ConfigError that names a field; a value of the wrong kind is always rejected, naming its field.

Runs in ~10 s (hypothesis, 600 + 300 + 200 examples, derandomized so CI is reproducible).
"""

import re

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bdm_jax.config import ConfigError, validate
from configs import default, digits, tiny

DEFAULT = default.get_config()


def _leaves(cfg, prefix=""):
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, prefix + key + ".")
        else:
            yield prefix + key, cfg.get_type(key)


LEAVES = dict(_leaves(DEFAULT))
GROUPS = sorted(k for k in DEFAULT.keys() if isinstance(DEFAULT[k], ml_collections.ConfigDict))
FIELD_RE = re.compile(r"^config\.([A-Za-z_][\w.]*)(=| is missing)")

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # includes ints beyond float range
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["latest", "latest_good", "stop", "rollback", "ddim", "pca", "block", "(", "a{99999999999}",
                     "digits", "tfds:mnist", "float32", "linear"]),
    st.lists(st.one_of(st.integers(-2, 40), st.booleans(), st.text(max_size=3), st.floats()), max_size=4).map(tuple),
    st.dictionaries(st.from_regex(r"[a-z_]{1,3}", fullmatch=True), st.integers(), max_size=2),  # ConfigDict keys
)


def _kind(value):
    """Independent of bdm_jax.config: the kind of value a field holds (numbers: int or float)."""
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float)):
        return float
    if isinstance(value, (tuple, list)):
        return tuple
    if isinstance(value, (dict, ml_collections.ConfigDict)):
        return dict
    return type(value)


def _wrong_kind(field, value):
    want = LEAVES[field]
    want = {int: float, list: tuple}.get(want, want)
    if value is None:
        return DEFAULT[field] is not None  # None is the value of a placeholder only
    if _kind(value) != want:
        return True
    default_items = DEFAULT[field] if want is tuple else ()
    return bool(default_items) and any(_kind(v) != _kind(default_items[0]) for v in value)


def _set(d, field, value):
    *path, key = field.split(".")
    for p in path:
        d = d[p]
    d[key] = value


def _check_outcome(cfg_dict):
    """validate either accepts or raises a one-line ConfigError naming a real field; returns that field."""
    try:
        validate(ml_collections.ConfigDict(cfg_dict))
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        m = FIELD_RE.match(msg)
        assert m, msg
        named = m.group(1)
        assert named in LEAVES or named in GROUPS, msg
        return named
    return None


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(sorted(LEAVES)), value=values, base=st.sampled_from([tiny, digits, default]))
def test_one_wrong_field(field, value, base):
    cfg = base.get_config().to_dict()
    _set(cfg, field, value)
    named = _check_outcome(cfg)
    if _wrong_kind(field, value):
        assert named == field, (field, value, named)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(st.sampled_from(sorted(LEAVES)), values, min_size=2, max_size=5))
def test_several_wrong_fields(changes):
    cfg = tiny.get_config().to_dict()
    for field, value in changes.items():
        _set(cfg, field, value)
    named = _check_outcome(cfg)
    wrong = {f for f, v in changes.items() if _wrong_kind(f, v)}
    if wrong:
        assert named in wrong, (changes, named)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(group=st.sampled_from(GROUPS), value=values.filter(lambda v: not isinstance(v, dict)))
def test_group_replaced_by_a_value(group, value):
    cfg = tiny.get_config().to_dict()
    cfg[group] = value
    assert _check_outcome(cfg) == group


def test_a_wrong_kind_is_named_before_a_wrong_value():
    """Found by test_several_wrong_fields: an empty method was reported before a cache_dir of None."""
    cfg = tiny.get_config().to_dict()
    _set(cfg, "method", "")
    _set(cfg, "autoencoder.cache_dir", None)
    assert _check_outcome(cfg) == "autoencoder.cache_dir"


@pytest.mark.parametrize("field, value, expected", [
    ("resume", "newest", "config.resume='newest' is not allowed: one of latest, latest_good"),
    ("train.nan_policy", "skip", "config.train.nan_policy='skip' is not allowed: one of stop, rollback"),
    ("train.steps", "10", "config.train.steps='10' is not allowed: expected a number"),
    ("train.steps", 2.5, "config.train.steps=2.5 is not allowed: expected an integer"),
    ("diffusion.beta_end", 10**400, "config.diffusion.beta_end=1000"),
    ("model.channel_mult", (1, "2"), "config.model.channel_mult=(1, '2') is not allowed: expected a tuple of items"),
    ("mesh.data", 0, "config.mesh.data=0 is not allowed: -1 (all remaining devices) or a positive axis size"),
    ("model.image_size", "8", "config.model.image_size='8' is not allowed: expected a number"),
    ("quant.fp_layers", "(", "config.quant.fp_layers='(' is not allowed: a valid regular expression"),
])
def test_named_examples(field, value, expected):
    cfg = tiny.get_config().to_dict()
    _set(cfg, field, value)
    with pytest.raises(ConfigError) as e:
        validate(ml_collections.ConfigDict(cfg))
    assert str(e.value).startswith(expected), str(e.value)


def test_every_shipped_config_is_valid():
    from configs import ddpm_cifar10, ldm4_bedrooms

    for module in (default, tiny, digits, ddpm_cifar10, ldm4_bedrooms):
        cfg = validate(module.get_config())
        assert cfg.resume == "latest" and cfg.train.nan_policy == "stop"


def test_configs_saved_before_the_reliability_fields_still_validate():
    cfg = tiny.get_config().to_dict()
    del cfg["resume"], cfg["train"]["nan_policy"]
    out = validate(ml_collections.ConfigDict(cfg))
    assert out.resume == "latest" and out.train.nan_policy == "stop"
