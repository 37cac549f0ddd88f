"""One strict-key rule (config/loading.py check_keys) for recipes, the model section, mixtures and
eval settings: each error names the full dotted path of the key and the allowed names."""

import pytest

from megatron_longctx.config.loading import ConfigError, check_keys, from_dict
from megatron_longctx.config.schema import ExperimentConfig, StageConfig
from megatron_longctx.data.mixture import MixtureError, MixtureSpec, mixture_from_dict
from megatron_longctx.eval.runner import EvalSettings

STAGE = dict(name="s", seq_length=64, steps=1, global_batch_size=2)


def test_check_keys_names_the_path_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        check_keys({"a": 1, "zz": 2, "b": 3}, {"a", "b"}, "x.0")
    assert str(err.value) == "unknown config key(s) x.0.zz; allowed under x.0: a, b"
    with pytest.raises(ValueError, match="missing required keys y.c$"):
        check_keys({"a": 1}, {"a", "c"}, "y", noun="keys", error=ValueError, required=("c",))
    check_keys({"a": 1}, {"a", "b"})  # fine


@pytest.mark.parametrize(
    "build,error,message",
    [
        (
            lambda: from_dict(ExperimentConfig, {"name": "x", "stages": [{**STAGE, "bogus": 1}]}),
            ConfigError,
            "unknown config key(s) stages.0.bogus; allowed under stages.0: ",
        ),
        (
            lambda: ExperimentConfig("x", [StageConfig(**STAGE)], model={"hidden": 8}),
            ConfigError,
            "unknown config key(s) model.hidden; allowed under model: extra, ffn_hidden_size, ",
        ),
        (
            lambda: MixtureSpec([dict(name="a", prefixes=["/x"], weight=1.0, bucket=3)]),
            MixtureError,
            "component 'a': unknown keys mixture.components.0.bucket; allowed under "
            "mixture.components.0: mask_prefixes, max_tokens, min_tokens, name, prefixes, weight",
        ),
        (
            lambda: MixtureSpec([dict(name="a", weight=1.0)]),
            MixtureError,
            "component 'a': missing required keys mixture.components.0.prefixes",
        ),
        (
            lambda: mixture_from_dict({"components": [], "sed": 1}),
            MixtureError,
            "unknown keys mixture.sed; allowed under mixture: components, seed",
        ),
        (
            lambda: EvalSettings.from_dict({"depth": [0.5]}),
            ValueError,
            "unknown eval settings eval.depth; allowed under eval: batch_size, context_lengths, ",
        ),
    ],
    ids=["recipe", "model", "component", "component-missing", "mixture", "eval"],
)
def test_every_strict_parser_uses_the_one_rule(build, error, message):
    with pytest.raises(error) as err:
        build()
    assert message in str(err.value)
