"""Domain recipes: cMedQA2 / Lawyer-LLaMA conversion, and continuing a general adapter on medical data."""

import json
from pathlib import Path

import pytest
from helpers import SAMPLES
from helpers import run_cli as cli

from chinese_vicuna.config import load_config
from chinese_vicuna.data.cail import CAIL_PROMPT, cail_records, charge_name
from chinese_vicuna.data.convert import (
    LEGAL_PROMPT,
    MEDICAL_PROMPT,
    PATIENT_PREFIX,
    as_chat,
    cmedqa_paper_records,
    cmedqa_records,
    lawyer_records,
    numbered_reply,
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


# ---- the paper's cMedQA2 mapping, raw CAIL2018 cases, the 7B presets ----


@pytest.fixture
def cmedqa_repeated(tmp_path):
    """cMedQA2 layout with a repeated question text (ids 10 and 13) and an unanswered question."""
    q = tmp_path / "question.csv"
    q.write_text(
        'question_id,content\n10,头痛怎么办？\n11,"咳嗽,有痰"\n12,没有回答的问题\n13,头痛怎么办？\n', encoding="utf-8"
    )
    a = tmp_path / "answer.csv"
    a.write_text(
        "ans_id,question_id,content\n1,11,多喝水。\n2,13,按时睡觉。\n3,10,注意休息。\n4,10,必要时就医。\n",
        encoding="utf-8",
    )
    return q, a


def test_numbered_reply_is_the_papers_format():
    # the paper's script: ans = ans + "{}.{}\n".format(i + 1, v[i]) for every doctor's answer
    assert numbered_reply(["注意休息。", "必要时就医。"]) == "1.注意休息。\n2.必要时就医。\n"
    assert numbered_reply(["多喝水。"]) == "1.多喝水。\n"
    assert PATIENT_PREFIX == "病人："


def test_cmedqa_paper_style_merges_answers_and_repeated_questions(cmedqa_repeated):
    records, stats = cmedqa_paper_records(*cmedqa_repeated)
    assert records == [
        # ids 10 and 13 share their text: one record, answers in answer-file order
        {"instruction": MEDICAL_PROMPT, "input": "病人：头痛怎么办？", "output": "1.按时睡觉。\n2.注意休息。\n3.必要时就医。\n"},
        {"instruction": MEDICAL_PROMPT, "input": "病人：咳嗽,有痰", "output": "1.多喝水。\n"},
    ]
    assert stats == {"questions": 4, "answers": 4, "unanswered": 1, "merged": 1, "records": 2}
    records, _ = cmedqa_paper_records(*cmedqa_repeated, max_answers=2)
    assert [r["output"] for r in records] == ["1.按时睡觉。\n2.注意休息。\n", "1.多喝水。\n"]
    # the default style is unchanged: one record per answer, no prefix
    assert cmedqa_records(*cmedqa_repeated)[0][0] == {
        "instruction": MEDICAL_PROMPT, "input": "头痛怎么办？", "output": "注意休息。"
    }  # fmt: skip


def test_cmedqa_paper_style_cli(cmedqa_repeated, tmp_path):
    out = tmp_path / "medical.jsonl"
    p = cli("data", "convert", "cmedqa", "--questions", cmedqa_repeated[0], "--answers", cmedqa_repeated[1],
            "--out", out, "--style", "paper")  # fmt: skip
    assert (
        f"2 records from 4 questions and 4 answers (1 questions without an answer skipped, "
        f"1 repeated questions merged) written to {out}" in p.stdout
    )
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[1] == {"instruction": MEDICAL_PROMPT, "input": "病人：咳嗽,有痰", "output": "1.多喝水。\n"}
    from chinese_vicuna.data.datasets import load_conversations, parse_source

    assert len(load_conversations([parse_source(str(out))]).conversations) == 2  # valid training data


CAIL_OUTPUTS = [
    "罪名：盗窃罪。相关法条：第264条。刑期：6个月。罚金：3000元。",
    "罪名：危险驾驶罪。相关法条：第133条。刑期：2个月。罚金：2000元。",
    "罪名：故意伤害罪。相关法条：第234条、第67条。刑期：10个月。",
    "罪名：生产、销售假药罪。相关法条：第141条。刑期：14个月。罚金：20000元。",
    "罪名：盗窃罪、诈骗罪。相关法条：第264条、第266条、第69条。刑期：20个月。罚金：5000元。",
    "罪名：故意杀人罪。相关法条：第232条。刑期：无期徒刑。",
    "罪名：走私、贩卖、运输、制造毒品罪。相关法条：第347条、第57条。刑期：死刑。",
    "罪名：滥伐林木罪。相关法条：第345条、第37条。刑期：无。罚金：3000元。",
]


def test_cail_sample_converts_exactly():
    sample = SAMPLES / "cail_sample.json"  # CAIL's layout: one JSON case per line in a .json file
    facts = [json.loads(line)["fact"] for line in sample.read_text(encoding="utf-8").splitlines()]
    records = cail_records(str(sample))
    assert records == [{"instruction": CAIL_PROMPT, "input": f, "output": o} for f, o in zip(facts, CAIL_OUTPUTS)]
    assert CAIL_PROMPT == "根据下面的案件事实，给出罪名、相关法条和刑期。"


def test_cail_accepts_json_arrays_and_folders(tmp_path):
    case = {"fact": "被告人甲盗窃现金500元。", "meta": {"accusation": ["盗窃"], "relevant_articles": [264],
            "term_of_imprisonment": {"death_penalty": False, "life_imprisonment": False, "imprisonment": 3}}}  # fmt: skip
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "a.json").write_text(json.dumps([case], ensure_ascii=False), encoding="utf-8")
    write_jsonl(tmp_path / "cases" / "b.jsonl", [case])
    expected = {"instruction": CAIL_PROMPT, "input": "被告人甲盗窃现金500元。", "output": "罪名：盗窃罪。相关法条：第264条。刑期：3个月。"}
    assert cail_records(str(tmp_path / "cases")) == [expected, expected]
    assert charge_name("[走私、贩卖、运输、制造]毒品") == "走私、贩卖、运输、制造毒品罪"
    assert charge_name("盗窃罪") == "盗窃罪"


@pytest.mark.parametrize(
    "content, message",
    [(b"\n\n", "1: empty file; expected records"),
     (b'{"fact": "a", "meta": {"accusation": ["b"], "relevant_articles": [1], "term_of_imprisonment": '
      b'{"imprisonment": 1}}}\n{"fact": "\xff"}\n', "2: not valid UTF-8 (byte 10 of the line); expected UTF-8 text")],
)  # fmt: skip
def test_cail_unreadable_files_fail_whatever_on_bad_record(tmp_path, content, message):
    src = tmp_path / "data_test.json"
    src.write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as e:
            cail_records(str(src), on_bad_record=mode)
        assert str(e.value) == f"{src}:{message}"
    with pytest.raises(DataError, match="nope.json: file not found"):
        cail_records(str(tmp_path / "nope.json"))


def _case(**meta_changes):
    meta = {"accusation": ["盗窃"], "relevant_articles": [264], "punish_of_money": 0,
            "term_of_imprisonment": {"death_penalty": False, "life_imprisonment": False, "imprisonment": 6}}  # fmt: skip
    meta.update(meta_changes)
    return {"fact": "被告人某甲盗窃。", "meta": meta}


@pytest.mark.parametrize(
    "line, message",
    [
        ({"meta": _case()["meta"]}, "fact: expected a non-empty string, got NoneType"),
        ({"fact": "  ", "meta": _case()["meta"]}, "fact: expected a non-empty string, got an empty string"),
        ({"fact": "事实"}, "meta: expected a JSON object, got nothing (the key is missing)"),
        ({"fact": "事实", "meta": ["盗窃"]}, "meta: expected a JSON object, got list"),
        (_case(term_of_imprisonment={"death_penalty": False, "life_imprisonment": False, "imprisonment": 6.5}),
         "meta.term_of_imprisonment.imprisonment: expected a whole number of months (an integer >= 0), got 6.5"),
        (_case(term_of_imprisonment={"death_penalty": False, "life_imprisonment": False, "imprisonment": "6"}),
         'meta.term_of_imprisonment.imprisonment: expected a whole number of months (an integer >= 0), got "6"'),
        (_case(term_of_imprisonment={"death_penalty": False, "life_imprisonment": False}),
         "meta.term_of_imprisonment.imprisonment: expected a whole number of months (an integer >= 0), got NoneType"),
        (_case(term_of_imprisonment={"death_penalty": "false", "life_imprisonment": False, "imprisonment": 6}),
         'meta.term_of_imprisonment.death_penalty: expected true or false, got "false"'),
        (_case(term_of_imprisonment=6), "meta.term_of_imprisonment: expected a JSON object, got 6"),
        (_case(accusation=[]), "meta.accusation: expected a non-empty list, got list"),
        (_case(accusation="盗窃"), 'meta.accusation: expected a non-empty list, got "盗窃"'),
        (_case(accusation=["盗窃", ""]), 'meta.accusation[1]: expected a non-empty string, got ""'),
        (_case(relevant_articles=["264"]),
         'meta.relevant_articles[0]: expected an article number (an integer > 0), got "264"'),
        (_case(punish_of_money=-1), "meta.punish_of_money: expected a fine in yuan (an integer >= 0), got -1"),
        ([1, 2], "record: expected a JSON object, got list"),
        ("not json", "record: expected a JSON object (invalid JSON: Expecting value)"),
    ],
)  # fmt: skip
def test_cail_errors_name_file_line_field(tmp_path, line, message):
    src = tmp_path / "data_train.json"
    bad = line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
    src.write_text(json.dumps(_case(), ensure_ascii=False) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        cail_records(str(src))
    assert str(e.value) == f"{src}:2: {message}"
    skipped: list[str] = []
    assert len(cail_records(str(src), on_bad_record="skip", skipped=skipped)) == 1
    assert skipped == [f"{src}:2: {message}"]


def test_cail_and_lawyer_cli_stop_or_skip_bad_records(tmp_path):
    src = tmp_path / "data_train.json"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [_case(), {"fact": "事实"}, _case()]) + "\n",
                   encoding="utf-8")  # fmt: skip
    out = tmp_path / "legal.jsonl"
    p = cli("data", "convert", "cail", "--input", src, "--out", out, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"error: {src}:2: meta: expected a JSON object, got nothing (the key is missing)" in p.stderr
    assert not out.exists()
    p = cli("data", "convert", "cail", "--input", src, "--out", out, "--on-bad-record", "skip")
    assert f"2 records written to {out} (1 bad records skipped)" in p.stdout
    assert f"skipped: {src}:2: meta: expected a JSON object" in p.stdout
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"instruction": CAIL_PROMPT, "input": "被告人某甲盗窃。", "output": "罪名：盗窃罪。相关法条：第264条。刑期：6个月。"}] * 2
    from chinese_vicuna.data.datasets import load_conversations, parse_source

    assert len(load_conversations([parse_source(str(out))], dedup=False).conversations) == 2

    law = tmp_path / "law.jsonl"
    write_jsonl(law, [{"question": "q", "answer": "a"}, {"question": "q2"}])
    p = cli("data", "convert", "lawyer", "--input", law, "--out", tmp_path / "x.jsonl", "--on_bad_record", "skip")
    assert f"1 records written to {tmp_path / 'x.jsonl'} (1 bad records skipped)" in p.stdout
    assert cli("data", "convert", "cail", "--help").stdout.startswith("usage: chinese-vicuna data convert cail")


def test_chat_format_for_the_vicuna_chat_template(tmp_path):
    """--format chat: the legal question alone as the user turn (the paper's legal chat data); CAIL keeps its task."""
    law = tmp_path / "law.json"
    law.write_text(json.dumps([{"question": "试用期多久？", "answer": "最长六个月。"}], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "legal_chat.jsonl"
    cli("data", "convert", "lawyer", "--input", law, "--out", out, "--format", "chat")
    assert json.loads(out.read_text(encoding="utf-8")) == {"input": ["试用期多久？"], "output": ["最长六个月。"]}
    from chinese_vicuna.data.datasets import load_conversations, parse_source

    conv = load_conversations([parse_source(str(out))]).conversations[0]
    assert [(m.role, m.content) for m in conv.messages] == [("user", "试用期多久？"), ("assistant", "最长六个月。")]
    cail_out = tmp_path / "cail_chat.jsonl"
    cli("data", "convert", "cail", "--input", SAMPLES / "cail_sample.json", "--out", cail_out, "--format", "chat")
    first = json.loads(cail_out.read_text(encoding="utf-8").splitlines()[0])
    fact = json.loads((SAMPLES / "cail_sample.json").read_text(encoding="utf-8").splitlines()[0])["fact"]
    assert first == {"input": [f"{CAIL_PROMPT}\n{fact}"], "output": [CAIL_OUTPUTS[0]]}
    assert as_chat({"instruction": MEDICAL_PROMPT, "input": "病人：头痛", "output": "1.休息\n"}) == {
        "input": [f"{MEDICAL_PROMPT}\n病人：头痛"], "output": ["1.休息\n"]
    }  # fmt: skip


@pytest.mark.parametrize(
    "name, expected",
    [
        ("medical", dict(base_model="decapoda-research/llama-7b-hf", init_adapter="outputs/llama-7b-lora",
                         data_path=["data/cmedqa2.jsonl"], template="alpaca", mask="assistant", quantization="8bit",
                         num_epochs=3.0, batch_size=128, micro_batch_size=4, learning_rate=3e-4, cutoff_len=256,
                         val_size=1000, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                         lora_target_modules=["q_proj", "v_proj"], warmup_steps=100, lr_scheduler="linear")),
        ("legal", dict(base_model="yahma/llama-7b-hf", init_adapter="Chinese-Vicuna/Chinese-Vicuna-lora-7b-chatv1",
                       template="vicuna-chat", mask="last", quantization="8bit", num_epochs=6.0, batch_size=30,
                       micro_batch_size=6, learning_rate=3e-4, cutoff_len=2048, val_size=0, lora_r=8, lora_alpha=16,
                       lora_dropout=0.05, warmup_ratio=0.01, lr_scheduler="linear",
                       lora_target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "down_proj", "gate_proj",
                                            "up_proj"])),
    ],
)  # fmt: skip
def test_7b_domain_presets_carry_the_papers_hyperparameters(name, expected):
    path = ROOT / "configs" / f"continue-{name}-7b.yaml"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# chinese-vicuna train configs/continue-{name}-7b.yaml")
    flat = load_config(path).flat()
    assert {k: flat[k] for k in expected} == expected


def test_continue_on_medical_beats_the_general_adapter(tiny_model_dir, tmp_path):
    """General adapter -> continue on medical data (init_adapter); compare both on the medical validation split."""
    from chinese_vicuna.train.trainer import Trainer, run_training

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
    trainer = Trainer(cfg, progress_bar=False).setup()
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
