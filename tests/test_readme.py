"""The README stays true: every config key and every command is documented."""

from pathlib import Path

from chinese_vicuna.cli import build_parser
from chinese_vicuna.config import field_help

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_config_key_documented():
    missing = [k for k, _, _ in field_help() if f"`{k}`" not in README]
    assert not missing


def test_every_command_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"`{name}" not in README]
    assert not missing
