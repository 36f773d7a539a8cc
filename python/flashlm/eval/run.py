"""`flashlm eval MODEL --tasks ...`: each task read from its files, scored, and the results written.

    results = run_tasks(llm, read_tasks(parse_task_specs("mmlu:data/,gsm8k:test.jsonl")), shots=5, limit=50)
    print(format_table(results)); write_results("RESULTS.json", results, config)
"""

from flashlm.eval.formats import gsm8k_items
from flashlm.eval.generation import evaluate_gsm8k
from flashlm.eval.tasks import MULTIPLE_CHOICE, evaluate_multiple_choice, read_task


def read_tasks(specs: list) -> list:
    """[(task, items, dev items)] per (task, path) of parse_task_specs: every file read and checked (before a
    model is loaded to score them)."""
    return [(task, *(read_task(task, path) if task in MULTIPLE_CHOICE else (gsm8k_items(path), [])))
            for task, path in specs]


def run_tasks(llm, data: list, shots: int = 0, limit=None, chat: bool = False, max_tokens: int = 256,
              progress: bool = False) -> list:
    """One TaskResult per (task, items, dev items) of read_tasks, in order."""
    results = []
    for task, items, dev in data:
        if task in MULTIPLE_CHOICE:
            results.append(evaluate_multiple_choice(llm, task, items, dev, shots, limit, chat, progress))
        else:
            results.append(evaluate_gsm8k(llm, items, shots, limit, chat, max_tokens, progress))
    return results
