"""Prompts as lm-evaluation-harness writes them, so that scores compare with published ones.

    context, continuations = multiple_choice_prompt("mmlu", item, shots=dev_items[:5])
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]   # lm-eval's token split

Per task (after lm-eval's task files): MMLU's description line `The following are multiple choice questions
(with answers) about {subject}.` and a blank line, then `{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer:`
with continuations ` A` .. ` D`; C-Eval's Chinese description and `答案：`; GPQA's `What is the correct answer to
this question:...` with ` (A)` .. ` (D)`; HellaSwag's cleaned `{activity}: {context}` with its endings; a generic
JSONL as `Question: {question}\\nAnswer:` with its choices. A few-shot example is its question followed by its
right answer, the examples joined by a blank line before the item. With a chat template the whole context is
one user turn and the continuations lose their leading space (lm-eval's rule for chat templates).
"""

import re

from flashlm.eval.formats import LETTERS, Item

# C-Eval's subjects in Chinese, as its description lines name them.
CEVAL_SUBJECTS = {
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计", "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师", "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学", "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物", "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学", "college_economics": "大学经济学",
    "business_administration": "工商管理", "marxism": "马克思主义基本原理", "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "education_science": "教育学", "teacher_qualification": "教师资格", "high_school_politics": "高中政治",
    "high_school_geography": "高中地理", "middle_school_politics": "初中政治", "middle_school_geography": "初中地理",
    "modern_chinese_history": "近代史纲要", "ideological_and_moral_cultivation": "思想道德修养与法律基础", "logic": "逻辑学",
    "law": "法学", "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学",
    "professional_tour_guide": "导游资格", "legal_professional": "法律职业资格", "high_school_chinese": "高中语文",
    "high_school_history": "高中历史", "middle_school_history": "初中历史", "civil_servant": "公务员", "sports_science": "体育学",
    "plant_protection": "植物保护", "basic_medicine": "基础医学", "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师", "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师", "physician": "医师资格",
}

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def _lettered(choices, style: str) -> str:
    return "".join(f"\n{style.format(letter)} {choice}" for letter, choice in zip(LETTERS, choices))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag clean-up (the brackets are artifacts of its WikiHow part)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def description(task: str, subject: str) -> str:
    if task == "mmlu":
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    if task == "ceval":
        return f"以下是中国关于{CEVAL_SUBJECTS.get(subject, subject)}的单项选择题，请选出其中的正确答案。\n\n"
    return ""


def question_text(task: str, item: Item) -> str:
    if task == "mmlu":
        return f"{item.question.strip()}{_lettered(item.choices, '{}.')}\nAnswer:"
    if task == "ceval":
        return f"{item.question.strip()}{_lettered(item.choices, '{}.')}\n答案："
    if task == "gpqa":
        return (f"What is the correct answer to this question:{item.question}\nChoices:"
                f"{_lettered(item.choices, '({})')}\nAnswer:")
    if task == "hellaswag":
        return _hellaswag_clean(f"{item.extra.get('activity_label', '')}: {item.question}")
    return f"Question: {item.question}\nAnswer:"


def choice_texts(task: str, item: Item) -> list:
    """What each continuation says (without the delimiter): letters, or the answers themselves."""
    if task in ("mmlu", "ceval"):
        return list(LETTERS[:len(item.choices)])
    if task == "gpqa":
        return [f"({letter})" for letter in LETTERS[:len(item.choices)]]
    if task == "hellaswag":
        return [_hellaswag_clean(c) for c in item.choices]
    return list(item.choices)


def multiple_choice_prompt(task: str, item: Item, shots=(), chat_template=None) -> tuple:
    """(context, [continuation per choice]) for an item and its few-shot examples. chat_template: a function of
    messages -> text (the tokenizer's apply_chat_template), or None."""
    examples = "".join(question_text(task, s) + TARGET_DELIMITER + choice_texts(task, s)[s.answer] + FEWSHOT_DELIMITER
                       for s in shots)
    context = description(task, item.subject) + examples + question_text(task, item)
    delimiter = TARGET_DELIMITER
    if chat_template is not None:
        context, delimiter = chat_template([{"role": "user", "content": context}]), ""
    return context, [delimiter + c for c in choice_texts(task, item)]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """(context ids, continuation ids) as lm-eval splits them: trailing spaces of the context move to the
    continuation, the whole is encoded, and the continuation's tokens are those after the context's own encoding
    (no special tokens added: lm-eval's default for HF models)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=False))
    context_ids = list(tokenizer.encode(context, add_special_tokens=False))
    return context_ids, whole[len(context_ids):]
