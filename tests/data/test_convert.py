"""Domain recipes: cMedQA2 / Lawyer-LLaMA conversion, and continuing a general adapter on medical data."""

import json
from pathlib import Path

import pytest
from helpers import SAMPLES
from helpers import run_cli as cli

from chinese_vicuna.config import load_config
from chinese_vicuna.data.convert import (
    LEGAL_PROMPT,
    MEDICAL_PROMPT,
    cmedqa_records,
    lawyer_records,
    write_jsonl,
)
from chinese_vicuna.data.datasets import DataError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cmedqa(tmp_path):
    q = tmp_path / "question.csv"
    q.write_text(
        'question_id,content\n10,头痛怎么办？\n11,"咳嗽,有痰"\n12,没有回答的问题\n', encoding="utf-8"
    )
    a = tmp_path / "answer.csv"
    a.write_text(
        "ans_id,question_id,content\n1,11,多喝水。\n2,10,注意休息。\n3,10,必要时就医。\n", encoding="utf-8"
    )
    return q, a


def test_cmedqa_records(cmedqa):
    records, stats = cmedqa_records(*cmedqa)
    assert records == [
        {"instruction": MEDICAL_PROMPT, "input": "头痛怎么办？", "output": "注意休息。"},
        {"instruction": MEDICAL_PROMPT, "input": "咳嗽,有痰", "output": "多喝水。"},
    ]
    assert stats == {"questions": 3, "answers": 3, "unanswered": 1, "records": 2}
    records, stats = cmedqa_records(*cmedqa, per_question=0)
    assert [r["output"] for r in records] == ["注意休息。", "必要时就医。", "多喝水。"] and stats[
        "records"
    ] == 3
    assert MEDICAL_PROMPT == "扮演一个专业的医生并回答病人的问题。"


def test_cmedqa_errors(cmedqa, tmp_path):
    q, a = cmedqa
    bad = tmp_path / "bad_q.csv"
    bad.write_text("question_id,text\n1,x\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        cmedqa_records(bad, a)
    assert str(e.value) == f"{bad}:1: content: expected a column named 'content' (header: question_id,text)"
    bad_a = tmp_path / "bad_a.csv"
    bad_a.write_text("ans_id,question_id,content\n1,10,好\n2,99,答\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        cmedqa_records(q, bad_a)
    assert str(e.value) == f"{bad_a}:3: question_id: expected an id from {q}, got '99'"
    bad_a.write_text("ans_id,question_id,content\n1,10,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_a.csv:2: content: expected a non-empty value$"):
        cmedqa_records(q, bad_a)
    bad.write_text("question_id,content\n1,x\n1,y\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_q.csv:3: question_id: expected a unique id, got '1' twice"):
        cmedqa_records(bad, a)
    with pytest.raises(FileNotFoundError, match="nope.csv: file not found"):
        cmedqa_records(tmp_path / "nope.csv", a)


def test_lawyer_records_accept_three_key_styles(tmp_path):
    rows = [
        {"question": "试用期多久？", "answer": "最长六个月。"},
        {"input": "  欠薪怎么办？ ", "output": "申请劳动仲裁。"},
        {"instruction": "离婚财产如何分割？", "output": "协商或诉讼。"},
        {"instruction": "请回答：", "input": "租房押金不退怎么办？", "output": "先协商。"},
    ]
    src = tmp_path / "law.json"
    src.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    assert lawyer_records(str(src)) == [
        {"instruction": LEGAL_PROMPT, "input": "试用期多久？", "output": "最长六个月。"},
        {"instruction": LEGAL_PROMPT, "input": "欠薪怎么办？", "output": "申请劳动仲裁。"},
        {"instruction": LEGAL_PROMPT, "input": "离婚财产如何分割？", "output": "协商或诉讼。"},
        {"instruction": LEGAL_PROMPT, "input": "请回答：\n租房押金不退怎么办？", "output": "先协商。"},
    ]
    write_jsonl(tmp_path / "law.jsonl", rows)
    assert lawyer_records(str(tmp_path / "law.jsonl")) == lawyer_records(str(src))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q"}, "answer: expected a non-empty string, got NoneType"),
        ({"question": "q", "answer": 3}, "answer: expected a non-empty string, got int"),
        ({"input": "", "output": "a"}, "input: expected a non-empty question in instruction or input"),
        ({"instruction": ["q"], "output": "a"}, "instruction: expected a string, got list"),
        ({"output": "  "}, "output: expected a non-empty string, got an empty string"),
        ({"title": "q", "content": "a"}, "answer: expected question/answer, input/output or instruction/output keys, "
                                         "got title, content"),
    ],
)  # fmt: skip
def test_lawyer_errors_name_file_line_field(tmp_path, row, message):
    src = tmp_path / "law.jsonl"
    write_jsonl(src, [{"question": "好", "answer": "好"}, row])
    with pytest.raises(DataError) as e:
        lawyer_records(str(src))
    assert str(e.value) == f"{src}:2: {message}"


def test_convert_cli(cmedqa, tmp_path):
    out = tmp_path / "out" / "medical.jsonl"
    p = cli("data", "convert", "cmedqa", "--questions", cmedqa[0], "--answers", cmedqa[1], "--out", out,
            "--answers-per-question", "0")  # fmt: skip
    assert (
        f"3 records from 3 questions and 3 answers (1 questions without an answer skipped) written to {out}"
        in p.stdout
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"instruction": MEDICAL_PROMPT, "input": "头痛怎么办？", "output": "注意休息。"}
    assert "头痛" in out.read_text(encoding="utf-8")  # not ASCII-escaped

    src = tmp_path / "law.json"
    src.write_text(
        json.dumps([{"question": "试用期多久？", "answer": "最长六个月。"}], ensure_ascii=False),
        encoding="utf-8",
    )
    legal = tmp_path / "legal.jsonl"
    p = cli("data", "convert", "lawyer", "--input", src, "--out", legal)
    assert f"1 records written to {legal}" in p.stdout
    assert json.loads(legal.read_text(encoding="utf-8")) == {"instruction": LEGAL_PROMPT, "input": "试用期多久？",
                                                            "output": "最长六个月。"}  # fmt: skip
    # the output is valid training data
    from chinese_vicuna.data.datasets import iter_records, load_conversations, parse_source

    assert len(load_conversations([parse_source(str(legal))]).conversations) == 1 and list(
        iter_records(str(out))
    )

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n', encoding="utf-8")
    p = cli("data", "convert", "lawyer", "--input", bad, "--out", tmp_path / "x.jsonl", check=False)
    assert (
        p.returncode == 2 and f"error: {bad}:2: answer: expected a non-empty string, got NoneType" in p.stderr
    )
    assert not (tmp_path / "x.jsonl").exists() and "Traceback" not in p.stderr


@pytest.mark.parametrize(
    "cmd", [["data", "convert"], ["data", "convert", "cmedqa"], ["data", "convert", "lawyer"]]
)
def test_help(cmd):
    out = cli(*cmd, "--help").stdout
    assert out.startswith(f"usage: chinese-vicuna {' '.join(cmd)}")


@pytest.mark.parametrize("name, prompt", [("medical", MEDICAL_PROMPT), ("legal", LEGAL_PROMPT)])
def test_domain_configs_and_samples_agree(name, prompt):
    path = ROOT / "configs" / f"continue-{name}.yaml"
    assert (
        path.read_text(encoding="utf-8").splitlines()[0]
        == f"# chinese-vicuna train configs/continue-{name}.yaml --init_adapter outputs/demo"
    )
    cfg = load_config(path)
    assert cfg.data.data_path == [f"data/samples/{name}.jsonl"] and cfg.lora.init_adapter == "outputs/demo"
    assert cfg.data.template == "alpaca" and cfg.data.val_size > 0
    rows = [json.loads(line) for line in (SAMPLES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["instruction"] for r in rows} == {prompt}


def test_continue_on_medical_beats_the_general_adapter(tiny_model_dir, tmp_path):
    """General adapter -> continue on medical data (init_adapter); compare both on the medical validation split."""
    from chinese_vicuna.train.sft import SFTTrainer, run_training

    def flags(**kw):
        common = dict(base_model=tiny_model_dir, micro_batch_size=4, batch_size=4, learning_rate=1e-2, cutoff_len=96,
                      lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules="all-linear", report_to="none",
                      save_steps=1000, eval_steps=1000, dtype="float32", seed=11, group_by_length="false")  # fmt: skip
        common.update(kw)
        return [x for k, v in common.items() for x in (f"--{k}", str(v))]

    general = tmp_path / "general"
    run_training(load_config(None, flags(data_path=SAMPLES / "instruct.jsonl", output_dir=general, max_steps=10)),
                 progress_bar=False)  # fmt: skip
    cfg = load_config(None, flags(data_path=SAMPLES / "medical.jsonl", output_dir=tmp_path / "medical", max_steps=10,
                                  init_adapter=general, val_size=10))  # fmt: skip
    trainer = SFTTrainer(cfg, progress_bar=False).setup()
    val = trainer.data.val
    assert len(val) == 10  # the medical validation split

    def saved_adapter_loss(folder) -> float:
        """Medical validation loss of an adapter folder loaded by plain peft, independent of the trainer."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from chinese_vicuna.data.collate import collate
        from chinese_vicuna.train.loss import CausalLMLoss

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
        with torch.no_grad():
            total, n = CausalLMLoss(model)(**collate(val, trainer.tokenizer.pad_token_id))
        return float(total / n)

    general_loss = saved_adapter_loss(general)  # the general adapter it starts from, as saved
    assert abs(trainer.evaluate() - general_loss) < 1e-5  # --init_adapter really starts from those weights
    trainer.train()
    continued_loss = saved_adapter_loss(tmp_path / "medical")  # the continued adapter, as saved
    assert abs(trainer.evaluate() - continued_loss) < 1e-5
    print(f"medical validation loss: general {general_loss:.4f}, continued {continued_loss:.4f}")
    assert continued_loss < general_loss - 0.3, (general_loss, continued_loss)
