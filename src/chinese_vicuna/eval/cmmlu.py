"""CMMLU in its published layout: ``DIR/{dev,test}/<subject>.csv``.

Columns ``,Question,A,B,C,D,Answer`` (the first, unnamed, is the question's index). The prompt is
CMMLU's own (its ``src/mp_utils.py``): a header naming the subject in Chinese, ``shots`` solved
examples from ``dev``, then ``题目：`` + the question, ending in ``答案是：``. The 67 subjects,
their Chinese names and their categories are CMMLU's ``src/categories.py``: each subject has one
or two subcategories, each subcategory one of the five categories, so a subject such as
``ancient_chinese`` counts for both Social Science and China specific.
"""

from __future__ import annotations

from pathlib import Path

from .benchmarks import Benchmark
from .mcq import CHOICES, Question

# subcategory -> category, as CMMLU's `categories`
CATEGORY_OF = {
    **dict.fromkeys(["physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"],
                    "STEM"),
    **dict.fromkeys(["history", "philosophy", "law", "arts", "literature", "global"], "Humanities"),
    **dict.fromkeys(["linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                     "education", "sociology"], "Social Science"),
    "other": "Other",
    "china specific": "China specific",
}  # fmt: skip
CATEGORIES = ("STEM", "Humanities", "Social Science", "Other", "China specific")
# subject: Chinese name, subcategories (CMMLU's `name_en2zh` and `subcategories`)
SUBJECTS: dict[str, tuple[str, tuple[str, ...]]] = {
    line.split("|")[0]: (line.split("|")[1], tuple(line.split("|")[2].split(",")))
    for line in """
agronomy|农学|other
anatomy|解剖学|biology
ancient_chinese|古汉语|linguistics,china specific
arts|艺术学|arts
astronomy|天文学|physics
business_ethics|商业伦理|business
chinese_civil_service_exam|中国公务员考试|politics,china specific
chinese_driving_rule|中国驾驶规则|other,china specific
chinese_food_culture|中国饮食文化|culture,china specific
chinese_foreign_policy|中国外交政策|politics,china specific
chinese_history|中国历史|history,china specific
chinese_literature|中国文学|literature,china specific
chinese_teacher_qualification|中国教师资格|education,china specific
clinical_knowledge|临床知识|other
college_actuarial_science|大学精算学|math
college_education|大学教育学|education
college_engineering_hydrology|大学工程水文学|engineering
college_law|大学法律|law
college_mathematics|大学数学|math
college_medical_statistics|大学医学统计|statistics
college_medicine|大学医学|other
computer_science|计算机科学|computer science
computer_security|计算机安全|other
conceptual_physics|概念物理学|physics
construction_project_management|建设工程管理|other,china specific
economics|经济学|economics
education|教育学|education
electrical_engineering|电气工程|engineering
elementary_chinese|小学语文|linguistics,china specific
elementary_commonsense|小学常识|other,china specific
elementary_information_and_technology|小学信息技术|other
elementary_mathematics|初等数学|math
ethnology|民族学|culture,china specific
food_science|食品科学|other
genetics|遗传学|biology
global_facts|全球事实|global
high_school_biology|高中生物|biology
high_school_chemistry|高中化学|chemistry
high_school_geography|高中地理|geography
high_school_mathematics|高中数学|math
high_school_physics|高中物理学|physics
high_school_politics|高中政治|politics,china specific
human_sexuality|人类性行为|other
international_law|国际法学|law
journalism|新闻学|sociology
jurisprudence|法理学|law
legal_and_moral_basis|法律与道德基础|other
logical|逻辑学|philosophy
machine_learning|机器学习|computer science
management|管理学|business
marketing|市场营销|business
marxist_theory|马克思主义理论|philosophy
modern_chinese|现代汉语|linguistics,china specific
nutrition|营养学|other
philosophy|哲学|philosophy
professional_accounting|专业会计|business
professional_law|专业法学|law
professional_medicine|专业医学|other
professional_psychology|专业心理学|psychology
public_relations|公共关系|politics
security_study|安全研究|politics
sociology|社会学|culture
sports_science|体育学|other
traditional_chinese_medicine|中医中药|other,china specific
virology|病毒学|biology
world_history|世界历史|history
world_religions|世界宗教|global
""".strip().splitlines()
}
COLUMNS = {"id": "", "question": "Question", **{c: c for c in CHOICES}, "answer": "Answer"}


def subject_name(subject: str) -> str:
    """The Chinese name CMMLU's prompt uses (an unknown subject: its words)."""
    return SUBJECTS[subject][0] if subject in SUBJECTS else subject.replace("_", " ")


def format_question(q: Question, with_answer: bool = False) -> str:
    text = "题目：" + q.question + "".join(f"\n{c}. {q.options[c]}" for c in CHOICES) + "\n答案是："
    return text + f"{q.answer}\n\n" if with_answer else text


def build_prompt(subject: str, q: Question, examples: list[Question]) -> str:
    """CMMLU's prompt: header, solved examples, then the question ending in ``答案是：``."""
    head = f"以下是关于{subject_name(subject)}的单项选择题，请直接给出正确答案的选项。\n\n"
    return head + "".join(format_question(e, True) for e in examples) + format_question(q)


CMMLU = Benchmark(
    name="CMMLU",
    key="cmmlu",
    columns=COLUMNS,
    file=lambda data, split, subject: Path(data) / split / f"{subject}.csv",
    pattern=lambda split: "*.csv",
    prompt=build_prompt,
    categories={s: tuple(dict.fromkeys(CATEGORY_OF[c] for c in subs)) for s, (_, subs) in SUBJECTS.items()},
    category_order=CATEGORIES,
    splits=("dev", "test"),
    unanswered=None,
)
