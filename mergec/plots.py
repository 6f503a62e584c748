"""Plots of a merge report (matplotlib, written as PNG files)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mergec.errors import require_extra

if TYPE_CHECKING:
    from mergec.merge import MergeReport


def plot_report(report: "MergeReport", folder: Path, max_heatmaps: int = 24) -> list[Path]:
    """Heatmaps of the cross-model correlation of each matched space (A's units down, B's
    across) and a bar plot of matched vs. identity similarity per space."""
    require_extra("matplotlib", "plots", "MergeReport.plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(figure, name: str) -> None:
        path = folder / name
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    for space_id, similarity in list(report.similarities.items())[:max_heatmaps]:
        figure, axes = plt.subplots(figsize=(4, 3.5))
        image = axes.imshow(similarity.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        space = report.spec.spaces[space_id]
        axes.set_title(f"{space_id} ({space.size} units, probe {space.probe})", fontsize=8)
        axes.set_xlabel("unit of B")
        axes.set_ylabel("unit of A")
        figure.colorbar(image, ax=axes)
        save(figure, f"similarity_{space_id}.png")
    if report.depth is not None:
        for stage in report.depth.stages:
            figure, axes = plt.subplots(figsize=(4, 3.5))
            image = axes.imshow(stage["cka"].numpy(), cmap="viridis", vmin=0, vmax=1)
            axes.plot(stage["mapping"], range(len(stage["mapping"])), "r-o", markersize=4,
                      label="alignment")
            rows, columns = stage["cka"].shape
            axes.set_xticks(range(columns), stage["deep"], rotation=90, fontsize=6)
            axes.set_yticks(range(rows), stage["shallow"], fontsize=6)
            axes.set_xlabel("block of the deep model")
            axes.set_ylabel("block of the shallow model")
            axes.set_title(f"linear CKA, stage {stage['stage']}", fontsize=8)
            axes.legend(fontsize=7)
            figure.colorbar(image, ax=axes)
            save(figure, f"cka_stage{stage['stage']}.png")
    rows = [(s, m) for s, m in report.matches.items() if "matched_similarity" in m]
    if rows:
        figure, axes = plt.subplots(figsize=(max(4, 0.35 * len(rows)), 3))
        positions = range(len(rows))
        axes.bar([p - 0.2 for p in positions], [m["identity_similarity"] for _, m in rows],
                 width=0.4, label="unit i with unit i")
        axes.bar([p + 0.2 for p in positions], [m["matched_similarity"] for _, m in rows],
                 width=0.4, label=f"matched ({report.method})")
        axes.set_xticks(list(positions), [s for s, _ in rows], rotation=90, fontsize=7)
        axes.set_ylabel("mean correlation of merged pairs")
        axes.legend(fontsize=7)
        save(figure, "matched_similarity.png")
    if report.budget:
        save(budget_figure(report.budget, plt), "budget.png")
    return written


def budget_figure(budget: dict, plt) -> "object":
    """Agreement with the ensemble against size, one point per candidate of the size planner
    (full merges, partial merges and nothing merged apart), the chosen one and the budget
    marked."""
    figure, axes = plt.subplots(figsize=(6, 4))
    kinds = {"full": "full merges", "partial": "partial merges", "whole": "nothing merged"}
    for kind, name in kinds.items():
        group = sorted((c for c in budget["candidates"] if _kind(c) == kind),
                       key=lambda c: c["size"])
        axes.plot([c["size"] for c in group], [c["agreement"] for c in group], "o-",
                  markersize=4, label=name)
    chosen = next(c for c in budget["candidates"] if c["chosen"])
    axes.plot([chosen["size"]], [chosen["agreement"]], "*", color="tab:red", markersize=14,
              label=f"chosen: {chosen['label']}")
    axes.axvline(budget["budget"], color="grey", linestyle="--", label="budget")
    axes.set_xlabel(budget["measure"])
    axes.set_ylabel("agreement with the ensemble (held out)")
    axes.legend(fontsize=7)
    return figure


def _kind(candidate: dict) -> str:
    if candidate.get("whole"):
        return "whole"
    if candidate["stop_at"] is not None or candidate["heads"] != "average":
        return "partial"
    return "full"
