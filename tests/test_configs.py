"""The committed configs are what configs/generate.py writes, each one loads, and each grid plan is valid."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from softtokens.config import TrainConfig, config_from_dict
from softtokens.grid import jobs, load_plan

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_configs", ROOT / "configs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_are_generated_and_load(monkeypatch):
    files = _generator().files()
    stale = [rel for rel, text in files.items() if (ROOT / "configs" / rel).read_text() != text]
    assert not stale, f"run python configs/generate.py: {stale}"
    committed = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert committed - set(files) == {"demo.yaml"}, "a config that the generator does not write"
    monkeypatch.chdir(ROOT)
    for rel in files:
        if rel.startswith("grids/"):
            plan = load_plan(f"configs/{rel}")
            assert len(jobs(plan)) == len(plan.seeds) * len(plan.configs)
        else:
            config_from_dict(TrainConfig, yaml.safe_load((ROOT / "configs" / rel).read_text()), rel)


def test_the_ablations_are_the_papers():
    g = _generator()
    cfgs = {rel: yaml.safe_load(text.split("\n", 2)[2]) for rel, text in g.files().items() if rel.startswith("ablations/")}
    assert sorted(c["gamma"] for c in cfgs.values() if "gamma" in c) == [0.1, 1.0, 3.0]
    assert sorted(c["temperature"] for r, c in cfgs.items() if "tau" in r) == [0.001, 0.01, 0.1]
    topk = [c for c in cfgs.values() if c.get("noise_on") == "topk_logits"]
    assert sorted(c["top_k"] for c in topk) == [5, 50] and all(c["temperature"] == 1.0 and c["mode"] == "soft"
                                                               for c in topk)


def test_several_rewards_and_their_weights_in_yaml_flags_and_python():
    from softtokens.cli import build_parser, config_from_args

    cfg = config_from_dict(TrainConfig, {"reward": ["a.py:f", "b.py:g"], "reward_weights": [1, 0.5]})
    assert cfg.reward == "a.py:f,b.py:g" and cfg.reward_weights == [1.0, 0.5]
    assert TrainConfig(reward=["a.py:f", "b.py:g"], reward_weights=[1.0, 2.0]).reward == "a.py:f,b.py:g"
    args = build_parser().parse_args(["eval", "--reward", "a.py:f,b.py:g", "--reward-weights", "1,0.25"])
    from softtokens.config import EvalConfig

    assert config_from_args(EvalConfig, args).reward_weights == [1.0, 0.25]
    with pytest.raises(ValueError, match="reward_weights has 1 weights for 2 reward"):
        TrainConfig(reward="a.py:f,b.py:g", reward_weights=[1.0])
    with pytest.raises(ValueError, match="reward_timeout must be > 0"):
        TrainConfig(reward_timeout=0)
    with pytest.raises(ValueError, match="expected comma-separated numbers"):
        config_from_dict(TrainConfig, {"reward_weights": "1,x"})


def test_values_checked_when_the_config_is_built():
    from softtokens.config import EvalConfig

    with pytest.raises(ValueError, match="max_grad_norm must be > 0, or null for no clipping"):
        TrainConfig(max_grad_norm=-1.0)
    assert TrainConfig(max_grad_norm=None).max_grad_norm is None
    for bad, message in [(dict(mode="soft", temperature=0.0), "temperature must be > 0 for soft"),
                         (dict(gamma=-1.0), "gamma must be >= 0"),
                         (dict(answer_temperature=-0.5), "answer_temperature must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    assert TrainConfig().split == "train" and EvalConfig().split == "test", "eval reads a hub dataset's test split"


def test_config_md_lists_every_option_by_section():
    import dataclasses

    from softtokens.config import TRAIN_SECTIONS, options_markdown

    names = [n for section in TRAIN_SECTIONS.values() for n in section]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig)), "each option in one section"
    assert (ROOT / "docs" / "CONFIG.md").read_text() == options_markdown(), \
        "run: python -m softtokens.config > docs/CONFIG.md"


def test_engine_options_reach_train_and_eval_rollouts():
    from softtokens.config import EvalConfig

    kw = dict(engine="hf", cuda_graphs=False, compile_decoder=False, attention_kernel=False)
    assert TrainConfig(**kw).rollout(0, 2, 1.0).engine_options() == kw
    assert EvalConfig(**kw).rollout(4).engine_options() == kw
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        TrainConfig(engine="fast")
