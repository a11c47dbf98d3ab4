"""The report's figures, as PNG files: matplotlib with the Agg backend, imported inside each function.

Each function takes plain Python data (lists, dicts, uint8 numpy arrays) and a path, writes one
PNG and returns the path. Sizes grow with the number of classes or images so labels never
collide; PNG metadata leaves out matplotlib's version so the same numbers give the same file.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..io import atomic_path

DPI = 110
# Class names are the user's folder names. matplotlib's default font (DejaVu Sans) has Latin, Greek and
# Cyrillic but no Chinese, Japanese or Korean; since 3.6 it falls back glyph by glyph through the families
# in font.family, so the first of these that is installed follows it (Debian's fonts-noto-cjk gives the
# first). Only installed ones are listed: each missing one would log "findfont: not found" for every text.
CJK_FAMILIES = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Source Han Sans", "WenQuanYi Zen Hei",
                "Droid Sans Fallback", "PingFang SC", "Hiragino Sans", "Microsoft YaHei", "Malgun Gothic")
# What matplotlib warns when no font in the list has a character (it draws an empty box instead).
MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, works without a display
    import matplotlib.pyplot as plt

    families = list(plt.rcParams["font.family"])
    plt.rcParams["font.family"] = families + [f for f in installed_cjk_families() if f not in families]
    return plt


def installed_cjk_families() -> list[str]:
    """The families of CJK_FAMILIES that matplotlib finds on this machine, in that order."""
    from matplotlib.font_manager import fontManager

    installed = {font.name for font in fontManager.ttflist}
    return [family for family in CJK_FAMILIES if family in installed]


def font_list_files() -> str:
    """matplotlib's cached list of the installed fonts (a glob), made once: a font installed later is not in it."""
    import matplotlib

    return str(Path(matplotlib.get_cachedir()) / "fontlist-*.json")


@contextlib.contextmanager
def missing_glyphs() -> Iterator[set[str]]:
    """The characters the figures drawn in the block show as empty boxes (no installed font has them),
    in the set yielded once the block ends; matplotlib's warnings about them (one per glyph, figure and
    layout pass) are kept out of the log. Other warnings pass through."""
    missing: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield missing
    for warning in caught:
        if match := MISSING_GLYPH.match(str(warning.message)):
            missing.add(chr(int(match[1])))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return path


def _short(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def learning_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Train and validation loss and accuracy per epoch, one tick per whole epoch.

    curves: {"loss": {"train": [...], "val": [...]}, "accuracy": {...}}, one value per epoch.
    Loss falls by decades, so its axis is logarithmic once it spans one, labelled in plain numbers
    at 1, 2 and 5 times each power of ten (matplotlib's default labels only the powers, often none).
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "--s")):
            values = curves.get(metric, {}).get(split, [])
            ax.plot(range(1, len(values) + 1), values, style, markersize=3, label=split)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric.capitalize()} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    losses = [v for split in curves.get("loss", {}).values() for v in split]
    if losses and min(losses) > 0 and max(losses) / min(losses) >= 10:
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes[0].yaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    return _save(fig, path)


def per_class_bars(per_class: dict[str, dict], path: Path, limit: int = 30) -> Path:
    """Grouped precision / recall / F1 bars per class, on a 0..1 axis (the table has the exact values).

    A score evaluate left undefined (null: precision of a class never predicted, recall of one with
    no test image) is written "n/a" rather than drawn as 0. With more than `limit` classes the bars
    would be slivers: the `limit` lowest F1 are drawn (an undefined F1, no image and no prediction, last).
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    names = list(per_class)
    total = len(names)
    if total > limit:
        f1 = {name: per_class[name]["f1"] for name in names}
        names = sorted(names, key=lambda name: (f1[name] is None, f1[name] or 0.0, name))[:limit]
    n = len(names)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.55 * n + 2), 24), 4))
    width = 0.27
    colors = {"precision": "#4c72b0", "recall": "#dd8452", "F1": "#55a868"}
    for i, (score, color) in enumerate(zip(("precision", "recall", "f1"), colors.values())):
        for c, name in enumerate(names):
            value = per_class[name][score]
            x = c + (i - 1) * width
            if value is None:
                ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color=color)
            else:
                ax.bar(x, value, width, color=color)
    slanted = n > 12 or max(map(len, names)) > 4  # many or long names would run into each other
    ax.set_xticks(range(n), [_short(name) for name in names], rotation=45 if slanted else 0,
                  ha="right" if slanted else "center")
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("class")
    ax.set_ylabel("score")
    which = f": the {n} lowest F1 of {total} classes" if total > n else ""
    ax.set_title(f"Per-class precision, recall and F1 on the test split{which}")
    # Handles of their own: a class whose scores are all n/a draws no bar to take a legend entry from.
    ax.legend(handles=[Patch(color=color, label=label) for label, color in colors.items()], ncol=3,
              loc="upper center", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def confusion_heatmap(matrix: list[list[int]], class_names: list[str], path: Path) -> Path:
    """Counts of (true, predicted) pairs; every cell written when there are few enough classes."""
    plt = _pyplot()
    n = len(class_names)
    side = min(max(4.5, 0.5 * n + 2), 24)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="test images")
    labels = [_short(name) for name in class_names]
    slanted = max(map(len, labels)) > 2  # long names would run into each other
    ticks = {"fontsize": 6} if n > 30 else {}  # up to ~100 classes still get a readable name each
    ax.set_xticks(range(n), labels, rotation=45 if slanted else 0, ha="right" if slanted else "center", **ticks)
    ax.set_yticks(range(n), labels, **ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split)")
    if n <= 30:  # more cells than that and the numbers no longer fit
        top = max((v for row in matrix for v in row), default=0)
        for r in range(n):
            for c in range(n):
                count = matrix[r][c]
                if count:
                    ax.text(c, r, str(count), ha="center", va="center", fontsize=8 if n > 15 else 9,
                            color="white" if count > top / 2 else "black")
    fig.tight_layout()
    return _save(fig, path)


def misclassified_grid(images, labels: list[tuple[str, str]], total_wrong: int, total: int, path: Path,
                       columns: int = 8) -> Path:
    """A grid of misclassified test images (uint8 (N, C, H, W)), each titled with its (true, predicted) label.

    With none wrong it still writes a figure that says so, so the report's link never breaks.
    """
    plt = _pyplot()
    n = len(labels)
    if n == 0:
        fig, ax = plt.subplots(figsize=(5, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No misclassified test images\n(0 of {total})", ha="center", va="center", fontsize=13)
        return _save(fig, path)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i]
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        true, predicted = labels[i]
        ax.set_title(f"true {_short(true, 12)}\npred {_short(predicted, 12)}", fontsize=8, color="#b22222")
    shown = f" (the first {n} shown)" if n < total_wrong else ""
    fig.suptitle(f"Misclassified test images: {total_wrong} of {total}{shown}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def scaling_plot(rows: list[dict], path: Path, low_efficiency: float) -> Path:
    """Throughput and efficiency against the device count, one line per strategy and scaling mode;
    a dashed line marks `low_efficiency`, below which the report's lessons advise DDP."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row["samples_per_second"]:
            series.setdefault(f"{row['strategy']} {row['scaling']}", []).append(row)
    # DDP starts at 2 devices; its lines start from the one-device point they are compared with.
    for mode in ("weak", "strong"):
        base = [row for row in series.get(f"dp {mode}", []) if row["devices"] == 1]
        if base and f"ddp {mode}" in series:
            series[f"ddp {mode}"] = base + series[f"ddp {mode}"]
    for strategy in {row["strategy"] for row in rows}:  # one line where weak and strong are the same points
        weak, strong = series.get(f"{strategy} weak"), series.get(f"{strategy} strong")
        same = weak and strong and [(r["devices"], r["global_batch"]) for r in weak] == [
            (r["devices"], r["global_batch"]) for r in strong]
        if same:
            series[f"{strategy} weak = strong"] = series.pop(f"{strategy} weak")
            del series[f"{strategy} strong"]
    counts = sorted({row["devices"] for line in series.values() for row in line}) or [1]
    for label, line in series.items():
        xs = [row["devices"] for row in line]
        left.plot(xs, [row["samples_per_second"] for row in line], "-o", label=label)
        right.plot(xs, [100 * (row["efficiency"] or 0) for row in line], "-o", label=label)
    right.axhline(100, color="gray", linewidth=1, linestyle=":", label="ideal")
    right.axhline(100 * low_efficiency, color="#b22222", linewidth=1, linestyle="--",
                  label=f"{100 * low_efficiency:.0f}%")
    for ax, ylabel, title in ((left, "samples/s", "Training throughput"),
                              (right, "efficiency (%)", "Scaling efficiency")):
        ax.set_xticks(counts)
        ax.set_xlabel("devices")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylim(bottom=0)
    left.yaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    top = max((100 * (row["efficiency"] or 0) for line in series.values() for row in line), default=0)
    right.set_ylim(0, max(115, 1.1 * top))
    if len(counts) == 1:
        left.set_xlim(0.5, 1.5)
        right.set_xlim(0.5, 1.5)
        left.annotate("one device measured:\nno scaling curve", xy=(0.5, 0.2), xycoords="axes fraction",
                      ha="center", fontsize=9, color="#555555")
    fig.tight_layout()
    return _save(fig, path)
