"""The committed configs are what configs/generate.py writes, each one loads, and each grid plan is valid."""

import dataclasses
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


def test_the_paper_configs_keep_the_papers_estimator_and_the_cpu_recipes_name_their_departures():
    defaults = TrainConfig()
    for rel, text in _generator().files().items():
        if rel.startswith("grids/"):
            continue
        cfg = config_from_dict(TrainConfig, yaml.safe_load(text), rel)
        departs = (cfg.optim.cot_weight, cfg.optim.mixture_embedding_grad, cfg.rollout.antithetic) != (
            defaults.optim.cot_weight, defaults.optim.mixture_embedding_grad, defaults.rollout.antithetic)
        if rel.startswith("sums/"):
            assert departs == (cfg.cot.mode == "soft") and (not departs or "departure" in text.splitlines()[0]), rel
        else:
            assert not departs, f"{rel}: a paper config departs from the paper's estimator"
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert demo["mode"] == "soft" and demo["cot_weight"] == pytest.approx(1 / 576, rel=1e-3)


def test_the_ablations_are_the_papers():
    g = _generator()
    cfgs = {rel: yaml.safe_load(text.split("\n", 2)[2]) for rel, text in g.files().items() if rel.startswith("ablations/")}
    assert sorted(c["gamma"] for c in cfgs.values() if "gamma" in c) == [0.1, 1.0, 3.0]
    assert sorted(c["temperature"] for r, c in cfgs.items() if "tau" in r) == [0.001, 0.01, 0.1]
    topk = [c for c in cfgs.values() if c.get("noise_on") == "topk_logits"]
    assert sorted(c["noise_top_k"] for c in topk) == [5, 50] and all(c["temperature"] == 1.0 and c["mode"] == "soft"
                                                               for c in topk)


def test_several_rewards_and_their_weights_in_yaml_flags_and_python():
    from softtokens.cli import build_parser, config_from_args

    cfg = config_from_dict(TrainConfig, {"reward": ["a.py:f", "b.py:g"], "reward_weights": [1, 0.5]})
    assert cfg.grading.reward == "a.py:f,b.py:g" and cfg.grading.reward_weights == [1.0, 0.5]
    assert TrainConfig(reward=["a.py:f", "b.py:g"], reward_weights=[1.0, 2.0]).grading.reward == "a.py:f,b.py:g"
    args = build_parser().parse_args(["eval", "--reward", "a.py:f,b.py:g", "--reward-weights", "1,0.25"])
    from softtokens.config import EvalConfig

    assert config_from_args(EvalConfig, args).grading.reward_weights == [1.0, 0.25]
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
    assert TrainConfig(max_grad_norm=None).optim.max_grad_norm is None
    for bad, message in [(dict(mode="soft", temperature=0.0), "temperature must be > 0 for soft"),
                         (dict(gamma=-1.0), "gamma must be >= 0"),
                         (dict(answer_temperature=-0.5), "answer_temperature must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    assert TrainConfig().data.split == "train" and EvalConfig().data.split == "test", \
        "eval reads a hub dataset's test split"


def test_config_md_lists_every_option_by_section():
    from softtokens.config import COMMANDS, layout, options_markdown

    text = options_markdown()
    for cls in COMMANDS.values():
        section = text.split(f"(`{cls.__name__}`)", 1)[1].split("\n## ", 1)[0]
        assert sorted(n for n in layout(cls)) == sorted(line.split("`")[1] for line in section.splitlines()
                                                        if line.startswith("| `")), cls.__name__
    assert (ROOT / "docs" / "CONFIG.md").read_text() == text, "run: python -m softtokens.config > docs/CONFIG.md"


def test_no_option_is_declared_in_two_config_classes():
    import inspect

    from softtokens import config

    sections = [c for _, c in inspect.getmembers(config, inspect.isclass) if c.__module__ == config.__name__
                and "__dataclass_fields__" in c.__dict__ and not issubclass(c, config.Command)]
    declared = [(name, c.__name__) for c in sections for name in c.__dict__.get("__annotations__", {})]
    names = [n for n, _ in declared]
    assert len(sections) == 15 and not {n: c for n, c in declared if names.count(n) > 1}
    for cls in config.COMMANDS.values():  # a command declares only which sections it holds
        assert set(config.sections(cls).values()) <= set(sections)
        assert not set(config.sections(cls)) & set(names), "a section's name is no option's"


def test_a_command_passes_its_sections_down_whole():
    from softtokens.config import CoTConfig, EvalConfig, RolloutConfig

    kw = dict(engine="hf", cuda_graphs=False, compile_decoder=False, attention_kernel=False, marker="So:")
    train, ev = TrainConfig(**kw), EvalConfig(**kw)
    assert isinstance(train.rollout, RolloutConfig) and isinstance(train.cot, CoTConfig)
    for cfg in (train, ev):
        assert all(getattr(cfg.rollout, k) == v for k, v in kw.items())
    assert train.rollout.batch_size == train.flat()["rollout_batch_size"] == 64 and ev.rollout.answer_temperature == 0.0
    assert (train.rollout.max_cot_length, ev.rollout.max_cot_length) == (128, 512), "each command's own default"
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        TrainConfig(engine="fast")


def test_flat_and_nested_yaml_give_the_same_config():
    flat = {"learning_rate": "1e-5", "engine": "hf", "chat_template": True, "max_cot_length": 64, "mode": "fuzzy",
            "output_dir": "runs/x", "rollout_batch_size": 16}
    nested = {"optim": {"learning_rate": 1e-5}, "engine": {"engine": "hf"}, "prompt": {"chat_template": True},
              "rollout": {"max_cot_length": 64, "batch_size": 16}, "cot": {"mode": "fuzzy"},
              "output": {"output_dir": "runs/x"}}
    a, b = config_from_dict(TrainConfig, flat), config_from_dict(TrainConfig, nested)
    assert a == b and a.flat() == b.flat() and a.optim.learning_rate == 1e-5 and a.rollout.batch_size == 16
    c = dataclasses.replace(a, seed=3)
    assert c.rollout.seed == 3 and a.rollout.seed == 0 and c.optim == a.optim and c.optim is not a.optim, \
        "no section is shared"
    with pytest.raises(ValueError, match="optim has no option 'lr'"):
        config_from_dict(TrainConfig, {"optim": {"lr": 1e-5}})
    with pytest.raises(ValueError, match="learning_rate is given twice"):
        config_from_dict(TrainConfig, {"learning_rate": 1e-5, "optim": {"learning_rate": 2e-5}})
    with pytest.raises(ValueError, match="unknown key.*did you mean learning_rate"):
        config_from_dict(TrainConfig, {"learnig_rate": 1e-5})
    with pytest.raises(ValueError, match="unknown key.*batch_size"):  # train names it rollout_batch_size
        config_from_dict(TrainConfig, {"batch_size": 8})


def test_flags_take_the_nested_form_too(capsys):
    from softtokens.cli import build_parser, main, normalise_flags
    from softtokens.config import layout

    def parsed(*argv):  # train's flags override a config file: those not given are None
        args = build_parser().parse_args(normalise_flags(["train", *argv]))
        return TrainConfig(**{k: getattr(args, k) for k in layout(TrainConfig) if getattr(args, k) is not None})

    assert parsed("--optim.learning-rate", "1e-5", "--engine.engine=hf", "--rollout.batch_size", "8") == \
        parsed("--learning-rate", "1e-5", "--engine=hf", "--rollout-batch-size", "8")
    with pytest.raises(SystemExit):
        main(["train", "--optim.lr", "1"])
    assert "unknown flag --optim.lr" in capsys.readouterr().err


def test_an_error_names_the_option_as_the_command_calls_it():
    from softtokens.config import EvalConfig

    with pytest.raises(ValueError, match="^num_samples must be >= 1"):
        EvalConfig(num_samples=0)
    with pytest.raises(ValueError, match="^rollout_batch_size must be >= 1"):
        TrainConfig(rollout_batch_size=0)


@pytest.mark.parametrize("bad, message", [
    (dict(dtype="fp8"), "unknown dtype 'fp8'"), (dict(lora_dropout=1.0), "lora_dropout must be in"),
    (dict(mode="warm"), "unknown CoT mode"), (dict(max_cot_length=0), "max_cot_length must be >= 1"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"), (dict(estimator="ppo"), "unknown estimator"),
    (dict(save_strategy="epoch"), "unknown save_strategy"), (dict(report_to="mlflow"), "unknown report_to"),
    (dict(eval_mode="warm"), "unknown eval_mode"), (dict(seeds=[1, 1]), "seeds repeats"),
    (dict(grading_timeout=0), "grading_timeout must be > 0"), (dict(marker=" "), "marker must be non-empty"),
    (dict(prompt_template="no slot"), "needs|must contain"), (dict(num_generations=1), "rloo needs"),
])
def test_each_section_checks_its_values_when_built(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_a_bad_value_fails_in_the_cli_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from softtokens import cli, evaluate, models, ood, trainer

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    for module in (models, trainer, evaluate, ood):  # each module that holds the name (imported first, so kept)
        if hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", no_load)
    (tmp_path / "c.yaml").write_text("optim:\n  learning_rate: -1\n")
    for argv in (["train", "--config", str(tmp_path / "c.yaml")], ["eval", "--settings", "soft_warm"],
                 ["eval", "--limit", "0"], ["ood", "--protocol", "choose"], ["generate", "--question", "q", "--gamma", "-1"],
                 ["train", "--mode", "fuzzy", "--temperature", "0"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("softtokens: error: ") and err.count("\n") == 1, (argv, err)


def test_eval_runs_a_sweep_model_in_its_own_settings():
    from softtokens.config import EvalConfig

    cfg = EvalConfig(mode="soft", temperature=0.1, noise_on="hidden", gamma=0.5)
    soft, fuzzy, greedy = cfg.cot.setting("soft_sample"), cfg.cot.setting("fuzzy_sample"), cfg.cot.setting("soft_greedy")
    assert (soft.temperature, soft.noise_on, soft.gamma, soft.noise) == (0.1, "hidden", 0.5, True)
    assert (fuzzy.temperature, fuzzy.noise_on, fuzzy.gamma) == (1e-4, "embedding", 0.5)
    assert (greedy.temperature, greedy.noise) == (0.1, False)
    hard = EvalConfig(mode="hard", temperature=0.7)
    assert hard.cot.setting("hard_sample").temperature == 0.7 and hard.cot.setting("hard_greedy").temperature == 0.0
    default = EvalConfig()  # the paper's six settings
    assert [default.cot.setting(s).temperature for s in ("soft_sample", "fuzzy_sample", "hard_sample")] == [0.5, 1e-4, 1.0]


def test_a_resume_checks_each_section_the_same_way_in_train_eval_and_ood():
    from softtokens.config import EvalConfig, OODConfig

    for cls, may, may_not in ((TrainConfig, dict(max_steps=9, engine="hf", device="cpu"), dict(learning_rate=1.0)),
                              (EvalConfig, dict(batch_size=8, engine="hf", out="x"), dict(num_samples=4)),
                              (OODConfig, dict(batch_size=8, out="x"), dict(limit=3))):
        saved = cls().flat()
        assert cls(**may).resume_changes(saved) == [], cls.__name__
        assert [c.split(":")[0] for c in cls(**may_not).resume_changes(saved)] == list(may_not), cls.__name__
    old = TrainConfig().flat() | {"temperature": None}  # a config.yaml that kept the unresolved default
    assert TrainConfig().resume_changes(old) == []


def test_choices_are_literals_and_what_may_change_on_resume_is_field_metadata():
    from softtokens import choices
    from softtokens.config import (DTYPES, ENGINES, PROTOCOLS, REPORT_TO, SAVE_STRATEGIES, OODConfig, OptimConfig,
                                   choice_values, option_types)

    hints = option_types(TrainConfig)
    for name, values in [("mode", choices.MODES), ("eval_mode", choices.MODES), ("noise_on", choices.NOISE_ON),
                         ("estimator", choices.ESTIMATOR_NAMES), ("rollout_correction", choices.CORRECTIONS),
                         ("engine", ENGINES), ("dtype", DTYPES), ("report_to", REPORT_TO),
                         ("save_strategy", SAVE_STRATEGIES)]:
        assert choice_values(hints[name]) == values, name
    assert choice_values(option_types(OODConfig)["protocol"]) == PROTOCOLS
    assert choice_values(hints["learning_rate"]) == () and choice_values(hints["metric_for_best_model"]) == ()
    assert config_from_dict(TrainConfig, {"mode": "fuzzy"}).cot.mode == "fuzzy"
    with pytest.raises(ValueError, match="unknown engine 'fast': choose one of auto, static, hf"):
        config_from_dict(TrainConfig, {"engine": "fast"})
    meta = OptimConfig.__dataclass_fields__
    assert meta["max_steps"].metadata["resumable"] and "resumable" not in meta["learning_rate"].metadata
    assert "max_steps" in TrainConfig.resumable_options() and "learning_rate" in TrainConfig.fixed()
