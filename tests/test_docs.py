"""The commands the docs show parse as written (benchmarks/doc_commands.py runs them with small limits)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import doc_commands  # noqa: E402


def test_every_doc_command_parses_and_names_files_that_exist(tmp_path):
    from softtokens.cli import build_parser

    commands = doc_commands.doc_commands()
    assert len(commands) >= 20 and any("examples/exact_match.py:docstring" == w for w, _ in commands)
    parser = build_parser()
    for where, command in commands:
        argv, why = doc_commands.prepare(command, tmp_path)
        if argv is None:
            assert why, where
            continue
        cli = argv[argv.index("softtokens.cli") + 1:]
        try:
            parser.parse_args(cli)
        except SystemExit:
            raise AssertionError(f"{where}: `{command}` does not parse") from None
        for flag in ("--config", "--dataset", "--reward"):
            if flag in cli and "/" in cli[cli.index(flag) + 1]:
                path = cli[cli.index(flag) + 1].split(":")[0]
                assert (ROOT / path).exists(), f"{where}: {path} does not exist"


def test_the_trl_table_in_the_docs_is_the_one_the_cli_answers_with():
    from softtokens.trl_names import TRL_NAMES, markdown

    text = (ROOT / "docs" / "TRAINING.md").read_text()
    assert markdown() in text, "copy softtokens.trl_names.markdown() into docs/TRAINING.md (Coming from TRL)"
    from softtokens.config import TrainConfig, layout

    ours = set(layout(TrainConfig))
    for trl, (names, _) in TRL_NAMES.items():
        assert trl not in ours, f"{trl} is an option here: it needs no entry"
        assert all(n.strip() in ours for n in names.split(",") if n.strip()), f"{trl} names an option we lack"
