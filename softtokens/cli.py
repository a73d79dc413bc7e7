"""The command line: a thin layer that parses flags into the config dataclasses and calls the library.

    softtokens generate --mode soft --question "What is 3 + 4?" [--model M] [--show-top-k 5]
    softtokens eval --model M --datasets gsm8k,math500,olympiadbench --settings all --num-samples 32 --out DIR
    softtokens train --config configs/demo.yaml [--max-steps 10 ...]
    softtokens ood --model TRAINED --base BASE [--limit N] --out DIR
    softtokens report DIR [DIR ...] [--out DIR]
    softtokens grid PLAN.yaml [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import sys
import threading
import typing
from pathlib import Path

from softtokens import __version__
from softtokens.config import (COMMANDS, RENAMED, C, EvalConfig, GenerateConfig, OODConfig, TrainConfig,
                               choice_values, config_from_dict, flatten, layout, option_defaults, option_docs,
                               option_types, parse_floats, parse_seeds, renamed, value_types)
from softtokens.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse with errors in one line and a pointer to --help, not the whole usage (every subcommand's too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


class Floats(argparse.Action):
    """--reward-weights 1,0.5 or --reward-weights 1 0.5 (TRL's form): one list of floats."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, [x for v in values for x in parse_floats(v)])
        except ValueError as e:
            parser.error(f"argument {option_string}: {e}")


class Joined(argparse.Action):
    """A repeated --reward adds a reward (TRL's list of reward_funcs) instead of replacing the one before."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{before},{values}" if before and before != self.default else values)


def _flag_type(hint):
    """argparse type for a dataclass field: the non-None member of an Optional, str for a Literal (the config
    checks the value, with the same message as in a YAML file)."""
    return value_types(hint)[0]


def add_config_flags(parser: argparse.ArgumentParser, cls, overrides: bool = False) -> None:
    """One kebab-case flag per option of the command's config ``cls``, grouped by section, its help the field's
    docstring.

    With ``overrides`` every flag defaults to None, so only the flags given override a config file.
    """
    hints, defaults = option_types(cls), option_defaults(cls)
    docs = {k: v.replace("%", "%%") for k, v in option_docs(cls).items()}  # argparse formats help with %
    groups = {}
    for name, (section, _) in layout(cls).items():
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        flag, kind = "--" + name.replace("_", "-"), _flag_type(hints[name])
        default = None if overrides else defaults[name]
        if typing.get_origin(kind) is list and typing.get_args(kind) == (float,):
            groups[section].add_argument(flag, nargs="+", action=Floats, default=default, metavar="W",
                                         help=docs[name] + f" (default: {defaults[name]})")
            continue
        if typing.get_origin(kind) is list:
            kind = _seeds_flag
        if name == "reward":
            groups[section].add_argument(flag, action=Joined, default=default,
                                         help=docs[name] + " Repeat the flag for several.")
        elif kind is bool:
            groups[section].add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=docs[name])
        else:
            values = choice_values(hints[name])
            groups[section].add_argument(flag, type=kind, default=default,
                                         metavar="{" + ",".join(values) + "}" if values else None,
                                         help=docs[name] + f" (default: {defaults[name]})")


def _seeds_flag(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as e:  # argparse prints this message, not "invalid parse_seeds value"
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    return cls(**{name: getattr(args, name) for name in layout(cls) if hasattr(args, name)})


DESCRIPTION = """RL training and evaluation of language models whose chain of thought is soft, fuzzy or hard tokens
("Soft Tokens, Hard Truths", arXiv 2509.19170). Without --model, commands use the embedded SmolLM2-135M-Instruct."""

EPILOG = """examples:
  softtokens generate --mode soft --question "What is 3 + 4?"       see a soft CoT and its answer
  softtokens train --config configs/demo.yaml                       train the embedded model (CPU, ~10 min)
  softtokens eval --model runs/demo/checkpoint-best --limit 50      the six inference settings on 50 problems each
  softtokens report runs/eval                                        tables and plots of finished runs
  softtokens grid configs/grids/paper.yaml --dry-run                 the paper's grid: its runs and GPU-hours
Flags take dashes or underscores (--learning-rate, --learning_rate). `softtokens COMMAND --help` lists a command's."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="softtokens", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"softtokens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    gen = sub.add_parser("generate", allow_abbrev=False, help="answer one or more questions with a hard, soft or fuzzy CoT and show it")
    gen.add_argument("--question", action="append", required=True, help="question text (repeat for several)")
    gen.add_argument("--show-top-k", type=int, default=0, help="print the k most likely tokens of p at each CoT step")
    gen.add_argument("--json", action="store_true", help="print one JSON record per rollout instead of text")
    add_config_flags(gen, GenerateConfig)
    ev = sub.add_parser("eval", allow_abbrev=False, help="score a model on maths sets in the six inference settings (pass@1, pass@k)")
    ev.add_argument("--yes", action="store_true", help="run a whole evaluation on a CPU without asking for --limit")
    ev.add_argument("--dry-run", action="store_true", help="make every check the evaluation makes before it loads "
                    "the model, print the resolved config and the rollouts it would decode, and exit")
    add_config_flags(ev, EvalConfig)

    tr = sub.add_parser("train", allow_abbrev=False, help="RL-train a model (RLOO) with hard, soft or fuzzy CoTs; checkpoints are HF models")
    tr.add_argument("--config", default=None, help="a YAML file of TrainConfig keys (configs/*.yaml); flags override it. "
                    "With --resume and no --config, output_dir's saved config.yaml is the base")
    tr.add_argument("--dry-run", action="store_true", help="make every check the run makes before it loads the model "
                    "(data, rewards, lengths, output folder, resume rule), print the resolved config by section, the "
                    "batch and the steps, and exit: no model loaded, nothing written")
    add_config_flags(tr, TrainConfig, overrides=True)

    ood = sub.add_parser("ood", allow_abbrev=False, help="check a trained model kept its general skills (HellaSwag, ARC, MMLU) vs its base")
    add_config_flags(ood, OODConfig)

    grid = sub.add_parser("grid", allow_abbrev=False, help="train configs x seeds, evaluate each best checkpoint and the base, OOD, the paper's tables")
    grid.add_argument("plan", help="a grid plan (YAML: configs, seeds, train / eval / ood settings, out; configs/grids/)")
    grid.add_argument("--dry-run", action="store_true", help="print the runs, what is done and the estimated GPU-hours")
    grid.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    grid.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: bfloat16 on cuda)")

    rep = sub.add_parser("report", allow_abbrev=False, help="paper-style tables and plots of eval folders, curves of training folders")
    rep.add_argument("runs", nargs="+", help="evaluation folders (config.json, records/) or training output_dirs")
    rep.add_argument("--out", default=None, help="where to write results.md and the plots (default: the one run)")
    return parser


def cmd_generate(args) -> int:
    from softtokens.prompts import format_prompt

    run = config_from_args(GenerateConfig, args)
    cot_cfg, cfg = run.cot, dataclasses.replace(run.rollout, record_top_k=max(args.show_top_k, 0))
    for question in args.question:
        format_prompt(question)  # an empty question fails here, before torch is imported or the model loads
    from softtokens.mismatch import near_tie_rate
    from softtokens.models import check_context, load_model, resolve_device
    from softtokens.rollout import generate_rollouts

    check_context(run.load.model, cfg.max_cot_length + cfg.max_answer_length)
    device, dtype = resolve_device(run.load.device, run.load.dtype)
    lm = load_model(run.load.model, dtype=dtype, device=device)
    rollouts = generate_rollouts(lm, args.question, cot_cfg, cfg)
    tok = lm.tokenizer
    if args.json:
        for r in rollouts:
            keep = ("question", "sample_index", "mode", "sigma", "cot_text", "stop_reason", "prefill_text", "answer_text")
            print(json.dumps({k: getattr(r, k) for k in keep} | {
                "cot_length": r.cot_length, "completion": r.completion,
                "near_tie_rate": near_tie_rate([r], cot_cfg.temperature)}))
        return 0
    n_params = sum(p.numel() for p in lm.model.parameters())
    print(f"model {run.load.model} ({type(lm.model).__name__}, {n_params / 1e6:.0f}M parameters, {device}, {dtype})")
    print(f"mode {cot_cfg.mode}  tau {cot_cfg.temperature:g}  sigma {rollouts[0].sigma:.5g} (gamma {cot_cfg.gamma:g})")
    if cot_cfg.mode == "hard":
        what = "hard: the argmax token at each step" if cot_cfg.temperature == 0 else \
            f"hard: tokens sampled at tau {cot_cfg.temperature:g}"
    else:
        fed = "p E + Gaussian noise" if cot_cfg.sampled else "p E, no noise (greedy)"
        what = f"{cot_cfg.mode}: inputs {fed}; the text is the argmax of p at each step"
    how = "greedy" if cfg.answer_temperature == 0 else f"sampled at temperature {cfg.answer_temperature:g}"
    for r in rollouts:
        print(f"\n=== question {args.question.index(r.question)} sample {r.sample_index}")
        print(f"--- CoT ({what}; {r.cot_length} steps, stopped on {r.stop_reason})")
        print(r.cot_text)
        if r.cot_top_ids is not None:
            print(f"--- top-{r.cot_top_ids.shape[1]} of p per CoT step")
            for t, (ids, ps) in enumerate(zip(r.cot_top_ids.tolist(), r.cot_top_probs.tolist())):
                print(f"{t:4d}  " + "  ".join(f"{tok.decode([i])!r} {p:.3f}" for i, p in zip(ids, ps)))
        print(f"--- prefill: {r.prefill_text!r}")
        print(f"--- answer ({how}): {r.completion}")
    return 0


def cmd_eval(args) -> int:
    cfg = config_from_args(EvalConfig, args)  # a bad value fails here, before torch is imported
    from softtokens.evaluate import check_eval, evaluate_model
    from softtokens.models import check_context, resolve_device
    from softtokens.report import report

    if args.dry_run:
        from softtokens.dry_run import eval_plan

        print(eval_plan(cfg))
        return 0
    datasets = check_eval(cfg)  # every input is checked before the model loads
    check_context(cfg.load.model, cfg.rollout.max_cot_length + cfg.rollout.max_answer_length)
    device, dtype = resolve_device(cfg.load.device, cfg.load.dtype)
    if device == "cpu" and cfg.data.limit is None and not args.yes:
        rows = sum(len(ds) for ds in datasets.values()) * sum(
            cfg.rollout.num_generations if cfg.cot.setting(s).sampled else 1 for s in cfg.inference.names())
        raise UsageError(f"this evaluation decodes {rows:,} rollouts of up to {cfg.rollout.max_cot_length} CoT tokens "
                         "on a CPU (days): pass --limit N to evaluate the first N problems of each set, or --yes to "
                         "run it all")
    evaluate_model(cfg, datasets=datasets)
    print(report([cfg.output.output_dir]))
    print(f"records, results.json, results.md, passk.png and entropy.png are in {cfg.output.output_dir}")
    return 0


def cmd_train(args) -> int:
    import yaml

    values, source = {}, "flags"
    if args.config:
        try:
            values = yaml.safe_load(open(args.config)) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {args.config}") from None
        except yaml.YAMLError as e:
            raise UsageError(f"{args.config}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{args.config}: must hold a mapping of TrainConfig keys")
        source = args.config
    elif args.resume:  # `train --output-dir D --resume`: the saved config is the base, flags override it
        saved = Path(args.output_dir or option_defaults(TrainConfig)["output_dir"]) / "config.yaml"
        if saved.is_file():
            values = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k != "sigma"}
            source = str(saved)
    values = flatten(TrainConfig, values, source)  # a nested file: its flags still override it
    values |= {name: getattr(args, name) for name in layout(TrainConfig) if getattr(args, name) is not None}
    cfg = config_from_dict(TrainConfig, values, source)  # a bad value fails here, before torch is imported
    if args.dry_run:
        from softtokens.dry_run import train_plan

        print(train_plan(cfg))
        return 0
    from softtokens.trainer import Stopped, train

    try:
        summary = train(cfg)
    except Stopped as e:
        again = args.argv + ([] if cfg.output.resume else ["--resume"])
        saved = (f"checkpoint-{e.step} is saved" if e.step and cfg.checkpoint.save_strategy != "no"
                 else "nothing was trained yet" if not e.step else "no checkpoint is kept (save_strategy no)")
        print(f"softtokens: stopped at step {e.step} ({signal.Signals(e.signum).name}); {saved}; "
              f"resume with: softtokens {' '.join(shlex.quote(a) for a in again)}", file=sys.stderr)
        return e.exit_code
    from softtokens.distributed import Dist

    if Dist.from_env().main:  # under torchrun, one summary
        print(json.dumps(summary))
    return 0


def cmd_ood(args) -> int:
    cfg = config_from_args(OODConfig, args)
    from softtokens.models import resolve_device
    from softtokens.ood import compare

    device, dtype = resolve_device(cfg.load.device, cfg.load.dtype)
    print(compare(cfg.load.model, cfg, device, dtype))
    print(f"records, ood.json, ood.md and ood.png are in {cfg.output.output_dir}")
    return 0


def cmd_grid(args) -> int:
    from softtokens.grid import describe, load_plan, run_grid
    from softtokens.models import resolve_device
    from softtokens.trainer import Stopped

    plan = load_plan(args.plan)
    print(describe(plan))
    if args.dry_run:
        return 0
    if resolve_device(args.device, args.dtype)[0] == "cpu" and flatten(EvalConfig, plan.eval).get("limit") is None:
        raise UsageError(f"{args.plan}: evaluating whole test sets on a CPU takes days; set eval: {{limit: N}}")
    try:
        print(run_grid(plan, args.device, args.dtype))
    except Stopped as e:
        print(f"softtokens: stopped during training ({signal.Signals(e.signum).name}); rerun "
              f"`softtokens grid {args.plan}` to go on where it stopped", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # the grid has no --resume: a rerun resumes
        print(f"softtokens: interrupted; finished work is on disk: rerun `softtokens grid {args.plan}` to go on",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    print(f"tables in {plan.out}/results.md")
    return 0


def cmd_report(args) -> int:
    from softtokens.report import report

    print(report(args.runs, args.out))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so eval and ood write what is graded before they exit."""


def _terminate(signum, frame):
    raise Terminated


def normalise_flags(argv: list[str]) -> list[str]:
    """--learning_rate and --learning-rate alike (TRL takes both): underscores in a flag's name become dashes.
    The nested form --optim.learning-rate (an option under its section, as YAML nests it) becomes
    --learning-rate; a section that does not hold the option leaves the flag unknown, for check_flags to name."""
    out, command = [], COMMANDS.get(next((a for a in argv if not a.startswith("-")), ""))
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            section, dot, option = name[2:].replace("-", "_").partition(".")
            if dot and command is not None:
                try:
                    name = "--" + next(iter(flatten(command, {section: {option: None}})))
                except UsageError:
                    pass
            elif section in RENAMED and command is not None and RENAMED[section][0] in layout(command):
                name = "--" + renamed(section, "flags")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def check_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An unknown flag is an error: TRL's name for an option gets the softtokens one (``trl_names``), any other
    the nearest real flag."""
    import difflib

    from softtokens.trl_names import trl_hint

    sub = parser._subparsers._group_actions[0].choices.get(next((a for a in argv if not a.startswith("-")), ""), parser)
    known = [s for action in sub._actions for s in action.option_strings if s.startswith("--")]
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
    if not flags:
        _, unknown = parser.parse_known_args(argv)
        flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
    if not flags:
        return
    name = flags[0]
    if hint := trl_hint(name):
        sub.error(hint)
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    sub.error(f"unknown flag {name}" + (f"; did you mean {near[0]}?" if near else ""))


def main(argv: list[str] | None = None) -> int:
    program = argv is None
    argv = normalise_flags(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    check_flags(parser, argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given, for the resume hint of a stopped run
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # train's own: checkpoint, then stop
    try:
        commands = {"generate": cmd_generate, "eval": cmd_eval, "train": cmd_train, "ood": cmd_ood, "report": cmd_report,
                    "grid": cmd_grid}
        return commands[args.command](args)
    except (UsageError, FileNotFoundError, FloatingPointError) as e:  # bad input; a bug keeps its traceback
        print(f"softtokens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("softtokens: interrupted; finished work is on disk, rerun with --resume to continue", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if main_thread:  # as the program: the work is saved, so a late SIGTERM must not mark it failed
            signal.signal(signal.SIGTERM, old if not program else signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
