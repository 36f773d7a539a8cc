"""Evaluation results out: a table for the terminal, RESULTS.json with every item's scores (two runs diff item by
item), and a bar chart of each task's subjects.

    print(format_table(results))
    write_results("RESULTS.json", results, {"model": "m.gguf", "shots": 5})
    plot_subjects("RESULTS.png", results)          # needs matplotlib
"""

import json
import math
import os

# The metrics a table shows, in this order, where a task has them.
TABLE_METRICS = ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible", "f1")


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def format_table(results: list) -> str:
    """A Markdown table: per task its overall metrics (micro averages), the macro average over subjects where
    there are several, then one row per subject."""
    metrics = [m for m in TABLE_METRICS if any(m in r.metrics for r in results)]
    lines = ["| task | subject | items | " + " | ".join(metrics) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in metrics) + " |"]
    for r in results:
        lines.append(f"| {r.name} | all (micro) | {r.metrics['count']} | "
                     + " | ".join(_cell(r.metrics.get(m)) for m in metrics) + " |")
        if len(r.subjects) > 1:
            lines.append(f"| {r.name} | all (macro) | {len(r.subjects)} subjects | "
                         + " | ".join(_cell(r.metrics.get(f"{m}_macro")) for m in metrics) + " |")
            for subject, s in r.subjects.items():
                lines.append(f"| {r.name} | {subject} | {s['count']} | "
                             + " | ".join(_cell(s.get(m)) for m in metrics) + " |")
    return "\n".join(lines)


def results_dict(results: list, config: dict) -> dict:
    return {"config": config,
            "results": {r.name: {"metrics": r.metrics, "subjects": r.subjects, "items": r.items} for r in results}}


def write_results(path, results: list, config: dict) -> None:
    """RESULTS.json: the run's configuration, and per task its metrics, per-subject metrics and every item (each
    choice's summed log-likelihood, token count and mean; the prediction), written whole or not at all."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results_dict(results, config), f, ensure_ascii=False, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def plot_subjects(path, results: list) -> None:
    """A PNG with one horizontal bar chart per task: each subject's first metric (acc or exact match)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(len(r.subjects), 1) for r in results]
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.2 + 0.3 * sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, r in zip(axes[:, 0], results):
        metric = next(m for m in TABLE_METRICS if m in r.metrics)
        names = list(r.subjects)
        ax.barh(names, [r.subjects[s][metric] for s in names], color="tab:blue")
        ax.axvline(r.metrics[metric], color="tab:red", linestyle="--", label=f"all: {r.metrics[metric]:.3f}")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_title(f"{r.name}: {metric}")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
