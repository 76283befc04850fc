"""C-Eval (prompts, scoring, CSV errors, CLI) and sliding-window perplexity, on models whose output we know."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import SAMPLES, make_tiny_llama
from helpers import run_cli as cli

from chinese_vicuna.data.datasets import DataError
from chinese_vicuna.eval.benchmarks import evaluate, predict
from chinese_vicuna.eval.ceval import CEVAL, COLUMNS, build_prompt
from chinese_vicuna.eval.mcq import Question, letter_ids, parse_answer, read_questions
from chinese_vicuna.eval.perplexity import perplexity, window_spans

ROOT = Path(__file__).resolve().parents[2]
CEVAL_DIR = SAMPLES / "ceval"
HEADER = "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"


def read_csv(path, need_answer: bool = True) -> list[Question]:
    return read_questions(path, COLUMNS, need_answer, "C-Eval")


class PreferLetter(torch.nn.Module):
    """A fake causal LM whose next-token logits always favour one answer letter; records its inputs.

    It keeps no KV cache, so prompts are scored whole; each batch row is recorded without its padding.
    """

    def __init__(self, tokenizer, letter: str, max_positions: int = 2048):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.vocab = len(tokenizer)
        self.favourite = letter_ids(tokenizer, "答案：")[0]["ABCD".index(letter)]
        self.inputs: list[list[int]] = []

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        if not use_cache:  # the shared-prefix pass (use_cache) is not a question
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            self.inputs += [row[m.bool()].tolist() for row, m in zip(input_ids, mask[:, -input_ids.shape[1] :])]
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 1.0
        return SimpleNamespace(logits=logits)


def test_prompts_are_c_evals_exactly():
    val = read_csv(CEVAL_DIR / "val" / "computer_network_val.csv")
    dev = read_csv(CEVAL_DIR / "dev" / "computer_network_dev.csv")
    assert build_prompt("computer_network", val[0], []) == (
        HEADER + "TCP建立连接的过程通常称为\nA. 两次握手\nB. 四次握手\nC. 一次握手\nD. 三次握手\n答案："
    )
    assert build_prompt("computer_network", val[0], dev[:2]) == (
        HEADER
        + "在OSI参考模型中，负责路由选择的是\nA. 物理层\nB. 数据链路层\nC. 传输层\nD. 网络层\n答案：D\n\n"
        + "HTTP协议默认使用的端口号是\nA. 443\nB. 21\nC. 80\nD. 25\n答案：C\n\n"
        + "TCP建立连接的过程通常称为\nA. 两次握手\nB. 四次握手\nC. 一次握手\nD. 三次握手\n答案："
    )
    q = Question("1", "问题", {"A": "甲", "B": "乙", "C": "丙", "D": "丁"}, "A")
    assert build_prompt("new_subject", q, []).startswith("以下是中国关于new subject考试的单项选择题")


def test_accuracy_is_the_fraction_of_the_favoured_letter(tokenizer):
    model = PreferLetter(tokenizer, "B")
    result = evaluate(model, tokenizer, CEVAL, CEVAL_DIR, progress=False)
    subjects = result["subjects"]
    assert list(subjects) == ["chinese_language_and_literature", "computer_network", "high_school_geography"]
    # the sample's B answers: 0, 2 and 1 of 12
    assert [(s["correct"], s["total"]) for s in subjects.values()] == [(0, 12), (2, 12), (1, 12)]
    assert subjects["computer_network"]["accuracy"] == 2 / 12
    assert result["average"] == (0 + 2 / 12 + 1 / 12) / 3 and result["overall"] == 3 / 36
    assert set(subjects["computer_network"]["predictions"].values()) == {"B"}
    assert result["mode"] == "logits" and result["shots"] == 0 and result["split"] == "val"
    # the model saw exactly the zero-shot prompt of every question (batched shortest first)
    want = [
        tokenizer(build_prompt(s, q, []))["input_ids"]
        for s in subjects
        for q in read_csv(CEVAL_DIR / "val" / f"{s}_val.csv")
    ]
    assert sorted(model.inputs) == sorted(want) and len(model.inputs) == 36


def test_few_shot_prompts_and_context_limit(tokenizer):
    val = read_csv(CEVAL_DIR / "val" / "computer_network_val.csv")[:2]
    dev = read_csv(CEVAL_DIR / "dev" / "computer_network_dev.csv")
    model = PreferLetter(tokenizer, "D")
    assert predict(model, tokenizer, CEVAL, "computer_network", val, dev[:3])[0] == ["D", "D"]
    assert tokenizer(build_prompt("computer_network", val[1], dev[:3]))["input_ids"] in model.inputs
    # a context too short for 3 examples: examples are dropped from the end until the prompt fits
    two = len(tokenizer(build_prompt("computer_network", val[0], dev[:2]))["input_ids"])
    small = PreferLetter(tokenizer, "A", max_positions=two)
    predict(small, tokenizer, CEVAL, "computer_network", val[:1], dev[:3])
    assert small.inputs[0] == tokenizer(build_prompt("computer_network", val[0], dev[:2]))["input_ids"]


def test_tiny_model_prediction_is_the_argmax_of_the_letter_logits(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=5).eval()
    questions = read_csv(CEVAL_DIR / "val" / "high_school_geography_val.csv")
    dev = read_csv(CEVAL_DIR / "dev" / "high_school_geography_dev.csv")
    preds = predict(model, tokenizer, CEVAL, "high_school_geography", questions, dev[:1])[0]
    want = []
    for q in questions:
        prompt = build_prompt("high_school_geography", q, dev[:1])
        letters, drop = letter_ids(tokenizer, prompt)
        assert tokenizer.convert_ids_to_tokens(letters) == ["A", "B", "C", "D"] and drop == 0
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        want.append("ABCD"[int(logits[letters].argmax())])
    assert preds == want


def test_generate_mode_counts_parsed_letters(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=5).eval()
    result = evaluate(
        model, tokenizer, CEVAL, CEVAL_DIR, ["computer_network"], generate=True, max_new_tokens=3, progress=False
    )
    s = result["subjects"]["computer_network"]
    answers = [q.answer for q in read_csv(CEVAL_DIR / "val" / "computer_network_val.csv")]
    preds = list(s["predictions"].values())
    assert result["mode"] == "generate" and len(preds) == 12 and set(preds) <= {"A", "B", "C", "D", None}
    assert s["correct"] == sum(p == a for p, a in zip(preds, answers, strict=True))
    assert s["no_letter"] == preds.count(None)


@pytest.mark.parametrize(
    "text, letter",
    [("答案是B。", "B"), ("答案：C", "C"), ("C. 三次握手", "C"), ("我认为选D", "D"), ("ABC", None), ("Because", None),
     (" A", "A"), ("正确答案为 A，因为……", "A")],
)  # fmt: skip
def test_parse_answer(text, letter):
    assert parse_answer(text) == letter


def test_bad_csv_reports_file_line_column(tmp_path):
    bad = tmp_path / "x_val.csv"
    bad.write_text("id,question,A,B,C,answer\n0,q,a,b,c,A\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_csv(bad)
    assert str(e.value) == f"{bad}:1: D: expected a column named 'D' (header: id,question,A,B,C,answer)"
    bad.write_text('id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,"two\nlines",a,b,c,d,E\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_csv(bad)
    assert str(e.value) == f"{bad}:4: answer: expected one of A, B, C, D, got 'E'"
    bad.write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"x_val.csv:2: answer: expected one of A, B, C, D, got an empty cell"
    ):
        read_csv(bad)
    assert read_csv(bad, need_answer=False)[0].answer is None  # the official test split has no answers


def test_window_spans():
    assert window_spans(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert window_spans(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert window_spans(3, 8, 4) == [(0, 3, 2)]
    assert sum(n for *_, n in window_spans(1000, 64, 16)) == 999


def _ce_sum(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


def test_perplexity_matches_direct_computation(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=2).eval()
    text = (SAMPLES / "pretrain.txt").read_text(encoding="utf-8")[:200]
    ids = tokenizer(text)["input_ids"]
    n = len(ids)
    # shorter than the window: exp(mean cross-entropy), computed directly
    r = perplexity(model, tokenizer, text, window=512, stride=256, progress=False)
    assert r["tokens"] == n and r["scored_tokens"] == n - 1 and r["windows"] == 1
    assert r["ppl"] == pytest.approx(math.exp(_ce_sum(model, ids) / (n - 1)), rel=1e-5)
    # stride == window: non-overlapping chunks, each scoring all but its first token
    chunks = [ids[i : i + 64] for i in range(0, n, 64)]
    want = sum(_ce_sum(model, c) for c in chunks) / sum(len(c) - 1 for c in chunks)
    r = perplexity(model, tokenizer, text, window=64, stride=64, progress=False)
    assert r["ppl"] == pytest.approx(math.exp(want), rel=1e-5) and r["windows"] == len(chunks)
    # stride < window: every token scored once, with the window's earlier tokens as context
    total = 0.0
    for begin, end, k in window_spans(n, 64, 16):
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0, -k - 1 : -1]
        total += float(F.cross_entropy(logits, torch.tensor(ids[end - k : end]), reduction="sum"))
    r = perplexity(model, tokenizer, text, window=64, stride=16, progress=False)
    assert r["scored_tokens"] == n - 1 and r["ppl"] == pytest.approx(math.exp(total / (n - 1)), rel=1e-5)
    assert r["bits_per_char"] == pytest.approx(r["nll"] / math.log(2) / len(text))


@pytest.mark.parametrize("cmd", [["eval", "ceval"], ["eval", "ppl"]])
def test_help(cmd, capsys):
    from chinese_vicuna.cli import main

    with pytest.raises(SystemExit):
        main([*cmd, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chinese-vicuna {' '.join(cmd)}")
    assert "--adapter" in out and "--model" in out


def _run(capsys, *args) -> SimpleNamespace:
    """The console script's code path in-process (no new interpreter), asserting success."""
    from chinese_vicuna.cli import main

    assert main([str(a) for a in args]) == 0
    return SimpleNamespace(stdout=capsys.readouterr().out)


def test_ceval_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "res" / "ceval.json"
    p = _run(capsys, "eval", "ceval", "--data", CEVAL_DIR, "--model", tiny_model_dir, "--subjects", "computer_network",
             "--shots", "2", "--output", out)  # fmt: skip
    result = json.loads(out.read_text())
    s = result["subjects"]["computer_network"]
    answers = {q.id: q.answer for q in read_csv(CEVAL_DIR / "val" / "computer_network_val.csv")}
    assert list(result["subjects"]) == ["computer_network"] and s["total"] == 12 and result["shots"] == 2
    assert s["correct"] == sum(p == answers[i] for i, p in s["predictions"].items())
    assert result["average"] == s["accuracy"] and result["model"] == str(tiny_model_dir)
    assert "computer_network" in p.stdout and "average" in p.stdout and f"written to {out}" in p.stdout
    assert not list(out.parent.glob("*.tmp"))


def test_ppl_cli(tiny_model_dir, tmp_path, capsys):
    from chinese_vicuna.model.adapters import load_for_inference
    from chinese_vicuna.model.vocab import read_texts

    data = tmp_path / "t.txt"
    data.write_text((SAMPLES / "pretrain.txt").read_text(encoding="utf-8")[:400], encoding="utf-8")
    out = tmp_path / "ppl.json"
    p = _run(
        capsys,
        "eval",
        "ppl",
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--window",
        "64",
        "--stride",
        "32",
        "--output",
        out,
    )
    r = json.loads(out.read_text())
    model, tok, _ = load_for_inference(str(tiny_model_dir), [])
    text = "\n\n".join(read_texts([data]))  # the command scores the file's paragraphs as one stream
    want = perplexity(model, tok, text, window=64, stride=32, progress=False)
    assert r["ppl"] == pytest.approx(want["ppl"], rel=1e-5) and r["scored_tokens"] == want["scored_tokens"]
    assert f"perplexity {r['ppl']:.3f} over {r['scored_tokens']} tokens" in p.stdout


def test_cli_errors(tmp_path, capsys):
    from chinese_vicuna.cli import main

    def err(*args) -> str:  # in-process: the console script's code path without a new interpreter
        assert main([str(a) for a in args]) == 2
        return capsys.readouterr().err

    (tmp_path / "val").mkdir()
    bad = tmp_path / "val" / "foo_val.csv"
    bad.write_text("id,question,A,B,C,answer\n0,q,a,b,c,A\n", encoding="utf-8")
    p = cli("eval", "ceval", "--data", tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert (
        p.stderr.strip()
        == f"error: {bad}:1: D: expected a column named 'D' (header: id,question,A,B,C,answer)"
    )
    assert err("eval", "ceval", "--data", CEVAL_DIR, "--subjects", "nope") == (
        f"error: {CEVAL_DIR / 'val' / 'nope_val.csv'}: C-Eval file not found\n"
    )
    assert err("eval", "ceval", "--data", CEVAL_DIR, "--shots", "6") == (
        "error: --shots: expected 0..5 (5 dev examples per subject), got 6\n"
    )
    assert err("eval", "ceval", "--data", tmp_path / "none") == (
        f"error: {tmp_path / 'none' / 'val'}: no such folder "
        "(expected the C-Eval layout: DIR/{dev,val,test}/<subject>_<split>.csv)\n"
    )
    assert err("eval", "ppl", "--data", bad, "--stride", "0") == (
        "error: --window/--stride: expected window >= 2 and 1 <= stride <= window, got window=512, stride=0\n"
    )
