"""`eval cmmlu`, `eval ceval --split test --submission`, `eval compare-results`, `eval compare --reference`:
each command on the bundled samples, and bad files reported as `file:line: column ...` without a traceback."""

import json
import re

import pytest
from helpers import SAMPLES, write_jsonl
from helpers import run_cli as cli

from chinese_vicuna.cli import main
from chinese_vicuna.eval.cmmlu import CMMLU
from chinese_vicuna.eval.metrics import corpus_scores

CEVAL_DIR, CMMLU_DIR = SAMPLES / "ceval", SAMPLES / "cmmlu"


def run(capsys, *args) -> tuple[int, str, str]:
    """The console script's code path in-process (no new interpreter): exit code, stdout, stderr."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", ["cmmlu", "ceval", "compare-results", "compare"])
def test_help(capsys, cmd):
    with pytest.raises(SystemExit):
        main(["eval", cmd, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chinese-vicuna eval {cmd}")
    flags = {"cmmlu": ["--with-prompt", "--shots", "--limit", "--batch-size", "--generate", "--template"],
             "ceval": ["--submission", "--with-prompt"], "compare-results": ["a", "b"], "compare": ["--reference"]}
    assert all(f in out for f in flags[cmd])


def test_cmmlu_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "res" / "cmmlu.json"
    code, stdout, _ = run(capsys, "eval", "cmmlu", "--data", CMMLU_DIR, "--model", tiny_model_dir, "--shots", "2",
                          "--limit", "3", "--batch-size", "2", "--with-prompt", "--output", out)  # fmt: skip
    assert code == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["benchmark"] == "cmmlu" and r["with_prompt"] == "alpaca" and r["shots"] == 2 and r["split"] == "test"
    assert [s["total"] for s in r["subjects"].values()] == [3, 3, 3]
    for name, s in r["subjects"].items():
        answers = {q.id: q.answer for q in CMMLU.read(CMMLU_DIR, "test", name)}
        assert s["correct"] == sum(p == answers[i] for i, p in s["predictions"].items())
    assert set(r["categories"]) == {"STEM", "Humanities", "Other", "China specific"}
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"average accuracy: \d+\.\d%", last) and last == f"average accuracy: {100 * r['average']:.1f}%"
    assert "[China specific]" in stdout and f"written to {out}" in stdout and not list(out.parent.glob("*.tmp"))


def test_ceval_test_split_submission(tiny_model_dir, tmp_path, capsys):
    # the official test split: no answer column, ids as written in the file
    (tmp_path / "test").mkdir()
    rows = (CEVAL_DIR / "test" / "computer_network_test.csv").read_text(encoding="utf-8").splitlines()
    lines = ["id,question,A,B,C,D"] + [f"{10 + k}," + ",".join(r.split(",")[1:6]) for k, r in enumerate(rows[1:])]
    (tmp_path / "test" / "computer_network_test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sub, res = tmp_path / "submission.json", tmp_path / "res.json"
    code, stdout, _ = run(capsys, "eval", "ceval", "--data", tmp_path, "--split", "test", "--model", tiny_model_dir,
                          "--submission", sub, "--output", res)  # fmt: skip
    assert code == 0
    submission = json.loads(sub.read_text(encoding="utf-8"))
    assert list(submission) == ["computer_network"]
    assert list(submission["computer_network"]) == ["10", "11", "12", "13", "14"]  # the file's ids, as strings
    assert all(v in ("A", "B", "C", "D") for v in submission["computer_network"].values())
    assert submission["computer_network"] == json.loads(res.read_text())["subjects"]["computer_network"]["predictions"]
    assert stdout.strip().splitlines()[-1] == "average accuracy: - (the test split has no answers)"
    assert f"submission written to {sub}" in stdout


def _result(kind: str, accs: dict[str, float]) -> dict:
    subjects = {s: {"total": 10, "correct": round(10 * a), "accuracy": a, "predictions": {}} for s, a in accs.items()}
    return {"benchmark": kind, "subjects": subjects}


def test_compare_results(tmp_path, capsys):
    a, b = tmp_path / "base.json", tmp_path / "tuned.json"
    a.write_text(json.dumps(_result("ceval", {"computer_network": 0.2, "high_school_geography": 0.4, "law": 0.3})))
    b.write_text(json.dumps(_result("ceval", {"computer_network": 0.5, "high_school_geography": 0.4, "law": 0.1})))
    code, out, _ = run(capsys, "eval", "compare-results", a, b)
    assert code == 0
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]] for line in out.splitlines()
            if line.count("│") == 5}  # fmt: skip
    assert rows["STEM"] == ["20.0", "50.0", "+30.0"] and rows["Social Science"] == ["40.0", "40.0", "+0.0"]
    assert rows["Humanities"] == ["30.0", "10.0", "-20.0"] and rows["average (3 subjects)"] == ["30.0", "33.3", "+3.3"]
    c = tmp_path / "cmmlu.json"
    c.write_text(json.dumps(_result("cmmlu", {"chinese_history": 0.5})))
    d = tmp_path / "cmmlu2.json"
    d.write_text(json.dumps(_result("cmmlu", {"chinese_history": 0.7})))
    code, out, _ = run(capsys, "eval", "compare-results", c, d)
    assert code == 0 and "China specific" in out and "Humanities" in out and "STEM" not in out
    code, _, err = run(capsys, "eval", "compare-results", a, c)
    assert code == 2 and err == f"error: {c.name[:-5]}: benchmark: expected 'ceval' like base, got 'cmmlu'\n"


def test_compare_with_reference(tiny_model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "介绍一下杭州西湖。"}, {"instruction": "一加一", "input": "等于几"}])
    refs = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "一加一", "input": "等于几", "reference": "等于二。"},
                                             {"instruction": "介绍一下杭州西湖。", "output": "西湖位于杭州。"}])  # fmt: skip
    out = tmp_path / "cmp.json"
    code, stdout, _ = run(capsys, "eval", "compare", "--model", tiny_model_dir, "--input", prompts, "--reference", refs,
                          "--max-new-tokens", "4", "--output", out)  # fmt: skip
    assert code == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    answers = [row["base"] for row in r["rows"]]
    assert [row["reference"] for row in r["rows"]] == ["西湖位于杭州。", "等于二。"]
    assert r["scores"]["base"] == pytest.approx(corpus_scores(answers, ["西湖位于杭州。", "等于二。"]))
    assert "char F1" in stdout and "ROUGE-L" in stdout
    # a prompt without a reference: found before any model is loaded
    write_jsonl(refs, [{"instruction": "一加一", "input": "等于几", "output": "二"}])
    code, _, err = run(capsys, "eval", "compare", "--input", prompts, "--reference", refs)
    assert code == 2 and err == f"error: {refs}: no reference for 1 prompt(s), the first: prompt 1 ('介绍一下杭州西湖。')\n"


def _cmmlu_dir(tmp_path, test: str, dev: str | None = None):
    for split, text in (("test", test), ("dev", dev)):
        if text is not None:
            (tmp_path / split).mkdir(exist_ok=True)
            (tmp_path / split / "arts.csv").write_text(text, encoding="utf-8")
    return tmp_path / "test" / "arts.csv"


def test_bad_files_are_clear_errors(tmp_path, capsys):
    good = ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n"
    bad = _cmmlu_dir(tmp_path, ",Question,A,B,C,D\n0,q,a,b,c,d\n")
    p = cli("eval", "cmmlu", "--data", tmp_path, check=False)  # the real entry point: no traceback
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr == f"error: {bad}:1: Answer: expected a column named 'Answer' (header: ,Question,A,B,C,D)\n"

    def err(*args) -> str:
        code, _, e = run(capsys, *args)
        assert code == 2
        return e

    _cmmlu_dir(tmp_path, ',Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,"two\nlines",a,b,c,d,E\n')
    assert err("eval", "cmmlu", "--data", tmp_path) == f"error: {bad}:4: Answer: expected one of A, B, C, D, got 'E'\n"
    _cmmlu_dir(tmp_path, ",Question,A,B,C,D,Answer\n")
    assert err("eval", "cmmlu", "--data", tmp_path) == f"error: {bad}: no questions (only a header)\n"
    bad.write_text("", encoding="utf-8")
    assert err("eval", "cmmlu", "--data", tmp_path) == (
        f"error: {bad}:1: Question: expected a column named 'Question' (header: empty file)\n")
    _cmmlu_dir(tmp_path, good)
    assert err("eval", "cmmlu", "--data", tmp_path, "--shots", "2") == (
        f"error: {tmp_path / 'dev' / 'arts.csv'}: --shots 2 needs the subject's dev file\n")
    _cmmlu_dir(tmp_path, good, good)
    assert err("eval", "cmmlu", "--data", tmp_path, "--shots", "2") == (
        f"error: {tmp_path / 'dev' / 'arts.csv'}: --shots 2 needs 2 examples, found 1\n")
    assert err("eval", "cmmlu", "--data", tmp_path, "--template", "alpaca") == (
        "error: --template: only used with --with-prompt\n")
    assert err("eval", "cmmlu", "--data", tmp_path / "nope") == (
        f"error: {tmp_path / 'nope' / 'test'}: no such folder (expected the CMMLU layout: DIR/{{dev,test}}/<subject>.csv)\n")
    assert err("eval", "cmmlu", "--data", CMMLU_DIR, "--batch-size", "0") == "error: --batch-size: expected 1 or more, got 0\n"
    junk = tmp_path / "junk.json"
    junk.write_text("{\n oops", encoding="utf-8")
    assert err("eval", "compare-results", junk, junk).startswith(f"error: {junk}:2: not valid JSON")
