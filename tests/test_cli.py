"""Every command through the real entry point (subprocess), with its files and its errors."""

import json
from pathlib import Path

import pytest
from helpers import run_cli as cli
from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd", [[], ["train"], ["import"], ["data", "inspect"], ["generate"], ["eval", "compare"]])
def test_help(cmd):
    out = cli(*cmd, "--help").stdout
    assert "usage: chinese-vicuna" in out
    if cmd == ["train"]:
        for key in ["base_model", "data_path", "lora_target_modules", "quantization", "resume", "init_adapter", "seed"]:
            assert f"--{key}" in out
    if not cmd:
        for sub in ["train", "import", "data", "generate", "eval"]:
            assert sub in out


def test_unknown_key_and_bad_value_are_clear(tmp_path):
    p = cli("train", "--lora_rr", "8", check=False)
    assert p.returncode == 2 and "unknown config key 'lora_rr' (did you mean 'lora_r'?)" in p.stderr
    p = cli("train", "--quantization", "3bit", check=False)
    assert p.returncode == 2 and "quantization: expected one of none, 4bit, 8bit" in p.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 10\nmicro_batch_size: 4\n")
    p = cli("train", cfg, check=False)
    assert p.returncode == 2 and "batch_size (10) must be a multiple of micro_batch_size (4)" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_data_reports_file_line_field(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 3}])
    p = cli("train", "--base_model", tiny_model_dir, "--data_path", bad, "--output_dir", tmp_path / "o", check=False)
    assert p.returncode == 2
    assert f"{bad}:2: output: expected a string, got int" in p.stderr
    assert "Traceback" not in p.stderr
    # --on_bad_record skip: trains on the rest and writes the rejects
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)] + [{"instruction": "c"}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    p = cli("train", "--base_model", tiny_model_dir, "--data_path", mixed, "--output_dir", tmp_path / "o2",
            "--on_bad_record", "skip", "--max_steps", "1", "--batch_size", "4", "--report_to", "none")
    assert "skipped 1 bad records" in p.stdout
    rejects = [json.loads(x) for x in (tmp_path / "o2" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["where"] == f"{mixed}:9"


def test_val_size_too_large(tiny_model_dir, alpaca_file, tmp_path):
    p = cli("train", "--base_model", tiny_model_dir, "--data_path", alpaca_file, "--val_size", "40",
            "--output_dir", tmp_path / "o", check=False)
    assert p.returncode == 2 and "val_size (40) must leave training data: there are only 40 samples" in p.stderr


def test_train_generate_compare_smoke(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {tiny_model_dir}\ndata_path: [{alpaca_file}]\noutput_dir: {out}\nmax_steps: 2\n"
                   "batch_size: 4\nmicro_batch_size: 2\nreport_to: [none]\ncutoff_len: 64\n")
    p = cli("train", cfg, "--lora_r", "4")
    assert f"adapter written to {out}" in p.stdout
    for name in ["adapter_model.safetensors", "adapter_config.json", "run_config.yaml", "chinese_vicuna.json", "loss.png"]:
        assert (out / name).exists()
    assert "lora_r: 4" in (out / "run_config.yaml").read_text()
    assert json.loads((out / "chinese_vicuna.json").read_text())["template"] == "alpaca"

    cli("generate", "--adapter", out, "--prompt", "你好", "--max-new-tokens", "5")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"问题{i}"} for i in range(3)])
    res = tmp_path / "gen.jsonl"
    cli("generate", "--adapter", out, "--input", prompts, "--output", res, "--max-new-tokens", "4", "--batch-size", "2")
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    cli("generate", "--adapter", out, "--input", prompts, "--output", res, "--max-new-tokens", "4")
    assert len(res.read_text().splitlines()) == 3  # resumed: nothing generated twice

    md = tmp_path / "cmp.md"
    cli("eval", "compare", "--adapter", f"mine={out}", "--input", prompts, "--limit", "2", "--max-new-tokens", "4", "--output", md)
    table = md.read_text()
    assert table.startswith("| prompt | base | mine |") and table.count("\n") == 4


def test_data_inspect(tmp_path):
    from helpers import SAMPLES

    p = cli("data", "inspect", SAMPLES / "chat.jsonl", "--template", "vicuna-chat", "--cutoff-len", "128")
    assert "User:" in p.stdout and "tokens_per_char" in p.stdout and "truncated" in p.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('[{"input": ["a"], "output": ["b", "c"]}]')
    p = cli("data", "inspect", bad, check=False)
    assert p.returncode == 2 and f"{bad}:1: input/output: expected lists of equal length" in p.stderr


def test_every_decoding_setting_is_a_flag_that_reaches_genargs(tiny_model_dir):
    """Each GenArgs field but the per-request ones is a flag of every generating command, and a value
    given on the command line arrives in the GenArgs used (chat: through ChatSession.set)."""
    import dataclasses

    from chinese_vicuna.chat.commands import make_session
    from chinese_vicuna.cli import build_parser
    from chinese_vicuna.generation.args import REQUEST_ONLY, GenArgs
    from chinese_vicuna.generation.commands import gen_args
    from chinese_vicuna.generation.engine import Engine

    fields = [f for f in dataclasses.fields(GenArgs) if f.name not in REQUEST_ONLY]
    assert {"length_penalty", "early_stopping"} <= {f.name for f in fields}
    argv, want = [], {}
    for f in fields:  # a valid value other than the default for each
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            argv.append(flag)
            want[f.name] = not f.default
        elif f.default is None:
            argv += [flag, "7"]
            want[f.name] = 7
        else:
            value = f.default + 1 if isinstance(f.default, int) else f.default / 2
            argv += [flag, str(value)]
            want[f.name] = value
    want = GenArgs(**want)
    assert want != GenArgs()
    parser = build_parser()
    for cmd in (["generate"], ["chat"], ["webui"], ["eval", "compare", "--input", "p.jsonl"]):
        assert gen_args(parser.parse_args(cmd + argv)) == want, cmd
        assert gen_args(parser.parse_args(cmd)) == GenArgs(), cmd
    session = make_session(parser.parse_args(["chat", *argv]), engine=Engine.load(str(tiny_model_dir)))
    assert session.gen == want
