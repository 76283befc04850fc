"""Multiple-choice scoring: letter ids per tokenizer, batched + cached == one at a time, --with-prompt text."""

from types import SimpleNamespace

import pytest
import torch
from helpers import SAMPLES, make_tiny_llama

from chinese_vicuna.data.formats import Conversation, Message
from chinese_vicuna.data.templates import get_template
from chinese_vicuna.data.tokenize import Renderer
from chinese_vicuna.eval import mcq
from chinese_vicuna.eval.benchmarks import evaluate, predict
from chinese_vicuna.eval.ceval import CEVAL, build_prompt
from chinese_vicuna.eval.cmmlu import CMMLU

CEVAL_DIR, CMMLU_DIR = SAMPLES / "ceval", SAMPLES / "cmmlu"


def test_letter_ids_are_read_at_the_answer_position(tokenizer, llama_tokenizer):
    # SentencePiece: the bare letter is "▁A" (word start), after "答案：" it is "A"
    sp = llama_tokenizer
    assert [sp.convert_ids_to_tokens(sp("A", add_special_tokens=False)["input_ids"])] == [["▁A"]]
    letters, drop = mcq.letter_ids(sp, "问题\n答案：")
    assert sp.convert_ids_to_tokens(letters)[:2] == ["A", "B"] and drop == 0
    assert letters[0] != sp.convert_tokens_to_ids("▁A")
    # each id is the last token of the full string "...答案：X"
    for c, i in zip("ABCD", letters, strict=True):
        assert sp("问题\n答案：" + c, add_special_tokens=False)["input_ids"][-1] == i
    # byte-level BPE: "A" after "：" or "\n"; after a trailing space the space merges into "ĠA", so
    # the space token leaves the prompt and the model is asked for "ĠA" where the full string has it
    bpe = tokenizer
    assert bpe.convert_ids_to_tokens(mcq.letter_ids(bpe, "答案：")[0]) == ["A", "B", "C", "D"]
    assert bpe.convert_ids_to_tokens(mcq.letter_ids(bpe, "### Response:\n")[0]) == ["A", "B", "C", "D"]
    letters, drop = mcq.letter_ids(bpe, "### Response: ")
    assert bpe.convert_ids_to_tokens(letters) == ["ĠA", "ĠB", "ĠC", "ĠD"] and drop == 1
    enc = mcq.PromptEncoder(bpe).question(lambda k: "### Response: ", 0, True)
    assert enc.ids == bpe("### Response:")["input_ids"] and enc.letters == letters


def test_letter_that_is_not_one_token_is_a_clear_error(llama_tokenizer):
    # the test SentencePiece vocabulary has no "▁C": " C" is "▁" + byte
    with pytest.raises(mcq.ConfigError, match=r"the answer letter 'C' does not tokenize as one token.*--generate"):
        mcq.letter_ids(llama_tokenizer, "答案是 ")


class Spy:
    """Counts forward passes and how many reuse a cache."""

    def __init__(self, model):
        self.calls, self.cached = 0, 0
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls += 1
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cached += cache is not None and cache.get_seq_length() > 0


@pytest.mark.parametrize("with_prompt", [False, True])
def test_batched_cached_scoring_equals_one_at_a_time(any_tokenizer, with_prompt):
    tok = any_tokenizer
    template = get_template("alpaca") if with_prompt else None
    model = make_tiny_llama(len(tok), seed=3).eval()
    questions = CEVAL.read(CEVAL_DIR, "val", "computer_network")
    examples = CEVAL.examples(CEVAL_DIR, "computer_network", 3)
    spy = Spy(model)
    slow, slow_lp = predict(model, tok, CEVAL, "computer_network", questions, examples, template,
                            batch_size=1, prefix_cache=False)  # fmt: skip
    assert spy.calls == 12 and spy.cached == 0
    spy.calls = 0
    fast, fast_lp = predict(model, tok, CEVAL, "computer_network", questions, examples, template, batch_size=5)
    assert spy.calls == 1 + 3 and spy.cached == 3  # one prefix pass, three batches reusing it
    assert fast == slow
    torch.testing.assert_close(torch.tensor(fast_lp), torch.tensor(slow_lp), atol=2e-5, rtol=0)
    # the log-probs are those of a plain forward pass over each whole prompt
    enc = mcq.PromptEncoder(tok, template, 512)
    for q, lp in zip(questions[:2], slow_lp, strict=False):
        e = enc.question(lambda k, q=q: build_prompt("computer_network", q, examples[:k]), 3, True)
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([e.ids])).logits[0, -1], -1)[e.letters]
        torch.testing.assert_close(torch.tensor(lp), want, atol=2e-5, rtol=0)


def test_with_prompt_renders_the_question_inside_the_template(any_tokenizer):
    tok = any_tokenizer
    q = CEVAL.read(CEVAL_DIR, "val", "computer_network")[0]
    enc = mcq.PromptEncoder(tok, get_template("alpaca"))
    e = enc.question(lambda k: build_prompt("computer_network", q, []), 0, True)
    assert e.text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "TCP建立连接的过程通常称为\nA. 两次握手\nB. 四次握手\nC. 一次握手\nD. 三次握手\n答案：\n\n### Response:\n"
    )
    conv = Conversation([Message("user", build_prompt("computer_network", q, []))])
    assert e.ids == Renderer(tok, get_template("alpaca")).prompt_ids(conv)
    assert tok.decode(e.ids, skip_special_tokens=True) == e.text
    # the vicuna-chat template: the letter follows its assistant header
    e = mcq.PromptEncoder(tok, get_template("vicuna-chat")).question(lambda k: "问题\n答案：", 0, True)
    assert e.text.endswith("polite to answer questions of user.\n\nUser:问题\n答案：\n\nAssistant:")
    assert [tok.decode([i]).strip() for i in e.letters] == ["A", "B", "C", "D"]


def test_cmmlu_prompt_is_cmmlus_exactly():
    dev = CMMLU.read(CMMLU_DIR, "dev", "chinese_history")
    q = CMMLU.read(CMMLU_DIR, "test", "chinese_history")[0]
    assert (q.id, q.answer, q.options["A"]) == ("0", "A", "秦朝")
    assert CMMLU.prompt("chinese_history", q, dev[:1]) == (
        "以下是关于中国历史的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：秦朝统一六国的时间是公元前\nA. 221年\nB. 206年\nC. 230年\nD. 202年\n答案是：A\n\n"
        "题目：中国历史上第一个统一的中央集权国家是\nA. 秦朝\nB. 汉朝\nC. 周朝\nD. 隋朝\n答案是："
    )


class Favourite(torch.nn.Module):
    """A fake LM that always puts its highest logit on one letter's token (no KV cache)."""

    def __init__(self, tokenizer, letter: str):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=2048)
        self.vocab, self.best = len(tokenizer), mcq.letter_ids(tokenizer, "答案是：")[0]["ABCD".index(letter)]

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.best] = 1.0
        return SimpleNamespace(logits=logits)


def test_cmmlu_subject_category_and_average_accuracy(tokenizer):
    r = evaluate(Favourite(tokenizer, "B"), tokenizer, CMMLU, CMMLU_DIR, split="test", shots=2, progress=False)
    assert r["benchmark"] == "cmmlu" and list(r["subjects"]) == [
        "chinese_history", "computer_science", "traditional_chinese_medicine"]  # fmt: skip
    # the sample's B answers: 2, 2 and 1 of 6
    assert [(s["correct"], s["total"]) for s in r["subjects"].values()] == [(2, 6), (2, 6), (1, 6)]
    # chinese_history: Humanities + China specific; computer_science: STEM; TCM: Other + China specific
    assert r["categories"] == pytest.approx(
        {"STEM": 2 / 6, "Humanities": 2 / 6, "Other": 1 / 6, "China specific": 1.5 / 6})
    assert r["average"] == pytest.approx(5 / 18) and r["overall"] == pytest.approx(5 / 18)
    limited = evaluate(Favourite(tokenizer, "A"), tokenizer, CMMLU, CMMLU_DIR, ["computer_science"], "test",
                       limit=2, progress=False)  # fmt: skip
    assert limited["subjects"]["computer_science"]["predictions"] == {"0": "A", "1": "A"}


def test_parse_answer_regex_is_documented():
    assert mcq.ANSWER_PATTERNS[0] in mcq.parse_answer.__doc__ or "ANSWER_PATTERNS" in mcq.parse_answer.__doc__
    assert mcq.parse_answer("题目很难，我选 C 吧") == "C" and mcq.parse_answer("无法确定") is None


def test_built_in_subject_tables():
    from collections import Counter

    from chinese_vicuna.eval import ceval, cmmlu

    # CMMLU: 67 subjects; per category as CMMLU's paper counts them (a subject can be in two)
    assert len(cmmlu.SUBJECTS) == 67 and cmmlu.subject_name("ancient_chinese") == "古汉语"
    assert Counter(c for cats in CMMLU.categories.values() for c in cats) == {
        "STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15}  # fmt: skip
    assert CMMLU.categories["chinese_history"] == ("Humanities", "China specific")
    # C-Eval: 52 subjects, one category each (clinical_medicine in Other, as in the C-Eval paper)
    assert len(ceval.SUBJECTS) == 52 and ceval.SUBJECTS["marxism"] == ("Marxism", "马克思主义基本原理", "Social Science")
    assert Counter(c for (c,) in CEVAL.categories.values()) == {
        "STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}  # fmt: skip
