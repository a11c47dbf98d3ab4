"""The report's text, lessons and figures from small files in the formats the analyze stage reads.

Each case writes what train and evaluate would (run.json with its per-epoch history, metrics.json,
per_class.json as evaluate computes it, predictions.csv), reads it back with the stage's own
readers, and checks what the report makes of it. The whole report on a real run is in
tests/test_analyze.py.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from stages import probe_skip
from stages.analyze import figures, report, stage
from stages.errors import UserError
from stages.run_summary import read_run_summary

from .helpers import run_summary

# --- the input files ---------------------------------------------------------------


def write_curves(train_dir: Path, curves: dict[str, dict[str, list[float]]], **run_changes) -> None:
    """run.json with these curves as its per-epoch history (and `run_changes` to its other keys)."""
    epochs = len(curves["loss"]["train"])
    history = [{"epoch": i + 1, **{f"{split}_{metric}": curves[metric][split][i] for metric in curves
                                   for split in ("train", "val")}} for i in range(epochs)]
    train_dir.mkdir(parents=True, exist_ok=True)
    run_summary(history=history, **run_changes).write(train_dir / "run.json")


def write_evaluation(eval_dir: Path, classes: list[str], pairs: list[tuple[str, str]]) -> None:
    """predictions.csv, and per_class.json computed from it as the evaluate stage does (an undefined score null)."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    eval_dir.mkdir(parents=True, exist_ok=True)
    with (eval_dir / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "actual", "predicted"])
        writer.writerows([i, a, p] for i, (a, p) in enumerate(pairs))
    index = {name: i for i, name in enumerate(classes)}
    actual, predicted = [index[a] for a, _ in pairs], [index[p] for _, p in pairs]
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=list(range(len(classes))), zero_division=np.nan)

    def score(value: float) -> float | None:
        return None if np.isnan(value) else round(float(value), 6)

    per_class = {name: {"precision": score(p), "recall": score(r), "f1": score(f), "support": int(s)}
                 for name, p, r, f, s in zip(classes, precision, recall, f1, support)}
    (eval_dir / "per_class.json").write_text(json.dumps(per_class, indent=2))
    accuracy = sum(a == p for a, p in pairs) / len(pairs)
    (eval_dir / "metrics.json").write_text(json.dumps({"test": {"accuracy": accuracy, "loss": 0.5}}))


def read_back(root: Path) -> dict:
    """What the analyze stage reads, read with its own readers."""
    run = read_run_summary(root / "train" / "run.json")
    return {"run": run, "curves": run.curves(),
            "per_class": json.loads((root / "evaluate" / "per_class.json").read_text()),
            "predictions": stage.read_predictions(root / "evaluate" / "predictions.csv"),
            "test": json.loads((root / "evaluate" / "metrics.json").read_text())["test"]}


HEALTHY_CURVES = {"accuracy": {"train": [0.80, 0.95, 0.98, 0.99, 0.99], "val": [0.85, 0.94, 0.96, 0.96, 0.96]},
                  "loss": {"train": [0.9, 0.3, 0.1, 0.06, 0.05], "val": [0.8, 0.3, 0.15, 0.14, 0.14]}}


def balanced(classes: list[str], per_class: int, wrong: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """`per_class` test images of each class, all right except one of each class in `wrong` (true -> predicted)."""
    pairs = []
    for name in classes:
        pairs += [(name, name)] * (per_class - 1) + [(name, (wrong or {}).get(name, name))]
    return pairs


def files(tmp_path: Path, classes: list[str], pairs: list[tuple[str, str]], curves: dict | None = None,
          **run_changes) -> dict:
    write_curves(tmp_path / "train", curves or HEALTHY_CURVES, **run_changes)
    write_evaluation(tmp_path / "evaluate", classes, pairs)
    return read_back(tmp_path)


def model_lessons(inputs: dict, val_images: int = 143) -> list[str]:
    """The model's lessons; the validation split has `val_images` images (digits' 143 unless told)."""
    return report.model_lessons(inputs["curves"], inputs["per_class"], inputs["predictions"], inputs["run"],
                                val_images)


def quality(inputs: dict) -> str:
    return "\n".join(report.quality_section(inputs["test"], inputs["per_class"], inputs["predictions"],
                                            inputs["curves"]))


def per_class_row(text: str, first_cell: str) -> list[str]:
    """A row of the per-class table (the pairs table below it starts with class names too)."""
    table = text.split("### Per-class scores", 1)[1].split("###", 1)[0]
    [line] = [line for line in table.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


# --- per-class scores: n/a where a score is 0/0 --------------------------------------


def test_scores_without_a_denominator_say_na(tmp_path):
    # 'c' has no test image and is never predicted; 'b' has test images but is never predicted.
    inputs = files(tmp_path, ["a", "b", "c"], [("a", "a")] * 6 + [("b", "a")] * 2)
    text = quality(inputs)
    assert per_class_row(text, "c")[1:] == ["n/a", "n/a", "n/a", "0"]
    assert per_class_row(text, "b")[1:] == ["n/a", "0.0000", "0.0000", "2"]  # recall 0 is real: 2 missed
    assert per_class_row(text, "a")[1:] == ["0.7500", "1.0000", "0.8571", "6"]
    assert "n/a: no test image of the class" in text


def test_per_class_figure_writes_na_instead_of_a_zero_bar(tmp_path, monkeypatch):
    inputs = files(tmp_path, ["a", "b", "c"], [("a", "a")] * 6 + [("b", "a")] * 2)
    [fig] = drawn(monkeypatch, figures.per_class_bars, inputs["per_class"], tmp_path / "per_class.png")
    [ax] = fig.axes
    assert sum(t.get_text() == "n/a" for t in ax.texts) == 4  # b's precision; c's precision, recall, F1
    assert len(ax.patches) == 5  # a's 3 bars; b's recall and F1 (0, drawn as 0)


# --- the confusion matrix, and the most-confused pairs -------------------------------


def test_many_classes_get_the_most_confused_pairs_as_a_table(tmp_path):
    classes = [f"species_{i:03d}" for i in range(200)]
    pairs = balanced(classes, 3, wrong={"species_010": "species_011"})
    pairs += [("species_042", "species_043")] * 4  # the most confused pair: 4 of 7 species_042 images
    inputs = files(tmp_path, classes, pairs)
    text = quality(inputs)
    assert "confusion.png" not in text and "200 classes are too many" in text
    pairs_table = text.split("most-confused pairs", 1)[1]
    first, second = [line for line in pairs_table.splitlines() if line.startswith("| species_")][:2]
    assert first == "| species_042 | species_043 | 4 | 57% of 7 |"
    assert second == "| species_010 | species_011 | 1 | 33% of 3 |"


def test_few_classes_keep_the_heatmap_and_list_the_pairs(tmp_path):
    classes = [str(d) for d in range(10)]
    inputs = files(tmp_path, classes, balanced(classes, 4, wrong={"3": "8", "5": "6"}))
    text = quality(inputs)
    assert "(figures/confusion.png)" in text and "too many" not in text
    assert "| 3 | 8 | 1 | 25% of 4 |" in text and "| 5 | 6 | 1 | 25% of 4 |" in text
    perfect = files(tmp_path, classes, balanced(classes, 4))
    assert "No test image was misclassified." in quality(perfect)


def rendered_tables(markdown: str) -> list[list[list[str]]]:
    """The text of every table cell as a GitHub-flavoured Markdown renderer (markdown-it-py) shows it."""
    from html.parser import HTMLParser

    from markdown_it import MarkdownIt

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.tables[-1][-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Cells()
    parser.feed(MarkdownIt("commonmark").enable("table").render(markdown))
    return parser.tables


def test_class_names_with_pipes_and_backslashes_stay_one_cell(tmp_path):
    classes = ["cat|dog", "back\\slash|", "bird"]  # folder names: anything but '/' goes
    pairs = balanced(classes, 4, wrong={"cat|dog": "back\\slash|", "bird": "cat|dog"})
    text = quality(files(tmp_path, classes, pairs))
    per_class, confused = rendered_tables(text)
    assert per_class[0] == ["class", "precision", "recall", "F1", "support"]
    assert [row[0] for row in per_class[1:]] == classes and {len(row) for row in per_class} == {5}
    assert sorted(row[:3] for row in confused[1:]) == [["bird", "cat|dog", "1"], ["cat|dog", "back\\slash|", "1"]]
    assert {len(row) for row in confused} == {4}


def test_per_class_figure_with_many_classes_draws_the_lowest_f1(tmp_path, monkeypatch):
    classes = [f"c{i:03d}" for i in range(200)]
    pairs = balanced(classes, 4, wrong={"c150": "c151", "c007": "c008"})
    inputs = files(tmp_path, [*classes, "unseen"], pairs)  # 'unseen': no test image, never predicted, F1 null
    [fig] = drawn(monkeypatch, figures.per_class_bars, inputs["per_class"], tmp_path / "per_class.png")
    names = [label.get_text() for label in fig.axes[0].get_xticklabels()]
    assert len(names) == report.MAX_CLASSES_IN_MATRIX
    assert names[:4] == ["c007", "c150", "c008", "c151"]  # F1 0.75 and 0.857 before the perfect ones
    assert "unseen" not in names  # an undefined F1 is not a low one
    assert "lowest F1 of 201 classes" in fig.axes[0].get_title()


# --- class names in Chinese, Japanese or Korean ---------------------------------------

CJK_FONT = figures.installed_cjk_families()


def drawn_glyph(character: str):
    """The pixels of one character drawn alone by the figures' matplotlib, with their font settings."""
    import numpy as np

    plt = figures._pyplot()
    fig = plt.figure(figsize=(0.5, 0.5), dpi=50)
    fig.text(0.5, 0.5, character, fontsize=20, ha="center", va="center")
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return pixels


def test_the_figures_fall_back_to_installed_cjk_fonts_only(caplog):
    """font.family keeps its default first (DejaVu Sans draws Latin and Cyrillic) and then lists the
    installed CJK families, none that is missing (matplotlib would log 'findfont: not found' per text)."""
    plt = figures._pyplot()
    family = plt.rcParams["font.family"]
    assert family[0] == "sans-serif" and family[1:] == CJK_FONT
    drawn_glyph("a")
    assert "findfont" not in caplog.text


@pytest.mark.skipif(not CJK_FONT, reason="matplotlib finds no CJK font (Debian: apt install fonts-noto-cjk, "
                                         "then delete its fontlist-*.json); the test without one runs instead")
def test_cjk_class_names_are_drawn_with_an_installed_font(tmp_path, monkeypatch):
    with figures.missing_glyphs() as missing:
        [fig] = drawn(monkeypatch, figures.confusion_heatmap, [[3, 1], [0, 4]], ["正方形", "квадрат"],
                      tmp_path / "confusion.png")
        glyphs = [drawn_glyph(c) for c in "正方"]
    assert missing == set()
    assert (glyphs[0] != glyphs[1]).any()  # two different characters, not two empty boxes
    assert [label.get_text() for label in fig.axes[0].get_yticklabels()] == ["正方形", "квадрат"]


@pytest.mark.skipif(bool(CJK_FONT), reason=f"a CJK font is installed ({', '.join(CJK_FONT)}): nothing is missing")
def test_without_a_cjk_font_the_figures_render_and_the_report_says_what_is_missing(tmp_path, monkeypatch):
    with figures.missing_glyphs() as missing:
        drawn(monkeypatch, figures.confusion_heatmap, [[3, 1], [0, 4]], ["正方形", "квадрат"],
              tmp_path / "confusion.png")
    assert missing == {"正", "方", "形"}  # Cyrillic is in the default font
    note = report.missing_glyphs_note(["正", "方", "形"], figures.font_list_files())
    assert note.startswith("the figures draw 正, 方, 形 (in class names) as empty boxes") and "fonts-noto-cjk" in note
    assert f"`rm {figures.font_list_files()}`" in note and figures.font_list_files().endswith("/fontlist-*.json")
    assert report.missing_glyphs_note([], figures.font_list_files()) is None


# --- the learning curves ------------------------------------------------------------


def drawn(monkeypatch, function, *args):
    """Call a figure function and return the matplotlib figures it saved (the PNG is written as usual)."""
    saved, save = [], figures._save

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    path = function(*args)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return saved


PLAIN_NUMBER = re.compile(r"^\d+(\.\d+)?$")


@pytest.mark.parametrize("loss", [[0.95, 0.15, 0.06, 0.042], [0.52, 0.41, 0.36, 0.33]],
                         ids=["spans-a-decade", "within-a-decade"])
def test_learning_curves_have_whole_epochs_and_readable_loss_labels(tmp_path, monkeypatch, loss):
    curves = {"loss": {"train": loss, "val": [v * 1.2 for v in loss]},
              "accuracy": {"train": [0.8, 0.9, 0.95, 0.97], "val": [0.8, 0.88, 0.9, 0.91]}}
    write_curves(tmp_path / "train", curves)
    read = read_run_summary(tmp_path / "train" / "run.json").curves()
    [fig] = drawn(monkeypatch, figures.learning_curves, read, tmp_path / "lc.png")
    loss_ax, accuracy_ax = fig.axes
    for ax in (loss_ax, accuracy_ax):
        low, high = ax.get_xlim()
        assert [t for t in ax.get_xticks() if low <= t <= high] == [1, 2, 3, 4]
    low, high = loss_ax.get_ylim()
    labels = [t.get_text() for t in loss_ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert len(labels) >= 3 and all(PLAIN_NUMBER.match(label) for label in labels), labels


# --- lessons about the model: each with inputs that trigger it and inputs that do not ---------------


def test_a_healthy_model_gets_one_line_with_its_numbers(tmp_path):
    classes = ["a", "b", "c"]
    [line] = model_lessons(files(tmp_path, classes, balanced(classes, 10, wrong={"b": "c"})))
    assert line.startswith("Nothing to flag in the model") and "gap 3.0 points" in line and "0.90 ('b')" in line


def test_large_train_val_gap_is_flagged(tmp_path):
    classes = ["a", "b"]
    pairs = balanced(classes, 10)
    overfit = {"accuracy": {"train": [0.7, 0.9, 1.0], "val": [0.6, 0.75, 0.8]},
               "loss": {"train": [0.8, 0.3, 0.01], "val": [0.9, 0.7, 0.8]}}
    [gap] = [line for line in model_lessons(files(tmp_path, classes, pairs, overfit)) if "gap" in line]
    assert "1.000 against validation 0.800" in gap and "20 points" in gap and "overfitting" in gap
    close = {**overfit, "accuracy": {"train": [0.7, 0.9, 1.0], "val": [0.6, 0.85, 0.95]}}
    assert not any("overfitting" in line for line in model_lessons(files(tmp_path, classes, pairs, close)))


# The new user's run: augment, keep best and patience on, stopped early at epoch 3 with epoch 1's weights.
STOPPED_EARLY = {"accuracy": {"train": [0.40, 0.50, 0.562], "val": [0.40, 0.35, 0.333]},
                 "loss": {"train": [1.5, 1.2, 1.0], "val": [1.5, 1.6, 1.7]}}


@pytest.mark.parametrize("on, suggested, left_out", [
    ({}, ["train.augment: true", "train.keep: best` with `train.patience", "train.weight_decay` (now 0.0005)"], []),
    ({"augment": True, "keep": "best"}, ["train.patience` (early", "train.weight_decay"],
     ["`train.augment: true`", "`train.keep: best`"]),
    ({"augment": True, "keep": "best", "patience": 2, "ema": 0.99, "weight_decay": 0.01},
     ["already on", "more data", "a smaller model", "train.weight_decay` (now 0.01)"],
     ["Try `", "`train.augment: true`", "`train.keep: best`"]),
])
def test_overfitting_remedies_leave_out_what_the_run_already_does(tmp_path, on, suggested, left_out):
    classes = ["a", "b"]
    kept = {"kept": "best (epoch 1)", "best_epoch": 1} if on.get("keep") == "best" else {"kept": "last (epoch 3)"}
    inputs = files(tmp_path, classes, balanced(classes, 10), STOPPED_EARLY, train_params=on, epochs_run=3, **kept)
    [gap] = [line for line in model_lessons(inputs) if "overfitting" in line]
    assert all(text in gap for text in suggested) and not any(text in gap for text in left_out), gap


def test_overfitting_names_the_epoch_it_judges_and_the_saved_one(tmp_path):
    classes = ["a", "b"]
    best = dict(train_params={"augment": True, "keep": "best", "patience": 2}, kept="best (epoch 1)", best_epoch=1)
    [gap] = [line for line in model_lessons(files(tmp_path, classes, balanced(classes, 10), STOPPED_EARLY, **best))
             if "overfitting" in line]
    assert "0.562 against validation 0.333 at the last epoch (3); the saved weights are epoch 1's" in gap
    assert "train 0.400 against validation 0.400 there" in gap
    [gap] = [line for line in model_lessons(files(tmp_path, classes, balanced(classes, 10), STOPPED_EARLY,
                                                  kept="last (epoch 3)", best_epoch=1)) if "overfitting" in line]
    assert "at the last epoch (3)." in gap and "saved weights" not in gap


# Curves of real runs (prepare-data, train, evaluate on the CPU): small-cnn on a folder of 300 of the 8x8
# digits (219 train / 21 val / 60 test images). Train accuracy leads validation by about 20 points while both
# losses still fall: the gap is BatchNorm's running statistics settling and 21 images' noise, not overfitting.
TWO_EPOCHS = {"accuracy": {"train": [0.255, 0.646], "val": [0.333, 0.429]},
              "loss": {"train": [2.207, 1.668], "val": [2.277, 2.254]}}
SIX_EPOCHS = {"accuracy": {"train": [0.26, 0.698, 0.885, 0.917, 0.948, 0.948],
                           "val": [0.286, 0.524, 0.714, 0.667, 0.762, 0.762]},
              "loss": {"train": [2.205, 1.578, 1.209, 0.999, 0.845, 0.792],
                       "val": [2.275, 2.22, 2.121, 2.003, 1.878, 1.75]}}
# The same folder with half the images in a random class folder, 40 epochs at lr 0.01, no weight decay (epochs 1-3,
# 10, 20 and 40 of the real run: the lesson reads the best epoch and the last): it learns the noise by heart.
MEMORISED = {"accuracy": {"train": [0.109, 0.188, 0.38, 0.922, 1.0, 1.0],
                          "val": [0.083, 0.208, 0.25, 0.25, 0.25, 0.292]},
             "loss": {"train": [2.449, 2.195, 1.924, 0.372, 0.005, 0.002],
                      "val": [2.33, 2.343, 2.273, 3.411, 4.824, 4.721]}}


def overfitting(lines: list[str]) -> list[str]:
    return [line for line in lines if "(overfitting)" in line]


def test_a_gap_on_a_few_validation_images_while_both_losses_fall_is_not_overfitting(tmp_path):
    classes = ["a", "b"]
    lines = model_lessons(files(tmp_path, classes, balanced(classes, 10), TWO_EPOCHS), val_images=21)
    assert not overfitting(lines) and any(line.startswith("Validation accuracy was still rising") for line in lines)
    [line] = model_lessons(files(tmp_path, classes, balanced(classes, 10), SIX_EPOCHS), val_images=21)
    assert line.startswith("Nothing to flag in the model: train/val accuracy gap 18.6 points at the last epoch (not "
                           "overfitting on this evidence: validation loss fell to its lowest at the last epoch; 21 "
                           "validation images put validation accuracy anywhere in 0.549–0.894)"), line


def test_one_uptick_of_validation_loss_after_two_epochs_is_not_overfitting(tmp_path):
    """The first report a new user sees on a few hundred images: train 0.28 against val 0.14 after 2 epochs,
    validation loss a hair up on 30 images. Neither the curves nor the split can tell that from noise."""
    classes = ["a", "b"]
    two = {"accuracy": {"train": [0.15, 0.28], "val": [0.10, 0.14]},
           "loss": {"train": [2.30, 2.10], "val": [2.290, 2.295]}}
    [line] = model_lessons(files(tmp_path, classes, balanced(classes, 10), two), val_images=30)
    assert line.startswith("Nothing to flag in the model: train/val accuracy gap 14.0 points at the last epoch (not "
                           "overfitting on this evidence: validation loss was not above its best for 2 epochs while "
                           "train loss fell; 30 validation images put validation accuracy anywhere in 0.053–0.297)"), (
        line)


def test_the_same_gap_on_enough_validation_images_is_overfitting(tmp_path):
    """5,000 images: validation accuracy's interval reaches 0.774, still 17 points under train's 0.948."""
    classes = ["a", "b"]
    [line] = overfitting(model_lessons(files(tmp_path, classes, balanced(classes, 10), SIX_EPOCHS), val_images=5000))
    assert "0.948 against validation 0.762" in line and "on 5000 validation images the 95% interval of validation " \
        "accuracy reaches only 0.774" in line and "validation loss rose" not in line


def test_diverging_losses_are_overfitting_on_few_images(tmp_path):
    classes = ["a", "b"]
    [line] = overfitting(model_lessons(files(tmp_path, classes, balanced(classes, 10), MEMORISED), val_images=24))
    assert ("1.000 against validation 0.292 at the last epoch (6). A gap of 71 points (over 10), and validation loss "
            "rose from its best 2.273 (epoch 3) to 4.721 while train loss fell from 1.924 to 0.002; on 24 validation "
            "images the 95% interval of validation accuracy reaches only 0.492") in line


def test_with_ema_only_diverging_losses_count_and_the_line_names_the_averages_lag(tmp_path):
    """Validation runs on train.ema's average, train accuracy on the live weights: a gap on many images may be
    the average's lag, so it is not called overfitting; diverging losses still are, with the lag said."""
    classes = ["a", "b"]
    ema = {"train_params": {"ema": 0.99}}
    [line] = model_lessons(files(tmp_path, classes, balanced(classes, 10), SIX_EPOCHS, **ema), val_images=5000)
    assert line.startswith("Nothing to flag") and "the gap includes the lag of train.ema's moving average (0.99)" \
        in line
    [line] = overfitting(model_lessons(files(tmp_path, classes, balanced(classes, 10), MEMORISED, **ema),
                                       val_images=24))
    assert "validation loss rose from its best 2.273" in line and "95% interval" not in line
    assert "(overfitting). The gap includes the lag of train.ema's moving average (0.99): validation runs on the " \
        "average of the weights, train accuracy on the live weights. Try" in line


def test_a_model_that_predicts_one_class_is_flagged(tmp_path):
    classes = ["cat", "dog", "fox"]
    everything_cat = [(name, "cat") for name in classes for _ in range(10)]
    lines = model_lessons(files(tmp_path, classes, everything_cat))
    [collapse] = [line for line in lines if "collapsed" in line]
    assert "'cat' for 30 of the 30 test images (100%)" in collapse and "33% of them" in collapse
    # A test set that is itself 95% cats, predicted right: no collapse.
    mostly_cats = [("cat", "cat")] * 95 + [("dog", "dog")] * 3 + [("fox", "fox")] * 2
    assert not any("collapsed" in line for line in model_lessons(files(tmp_path, classes, mostly_cats)))


def test_classes_with_near_zero_recall_are_named(tmp_path):
    classes = ["a", "b", "c", "empty"]
    pairs = [("a", "a")] * 20 + [("b", "a")] * 19 + [("b", "b")] + [("c", "c")] * 15 + [("c", "a")] * 5
    [low] = [line for line in model_lessons(files(tmp_path, classes, pairs)) if "recall under" in line]
    assert low.startswith("1 class of 3 with recall under 0.10") and "'b' 0.05 of 20" in low
    assert "'c'" not in low and "'empty'" not in low  # 0.75 is fine; no test image is no recall at all
    fine = [("a", "a")] * 20 + [("b", "a")] * 10 + [("b", "b")] * 10 + [("c", "c")] * 20
    assert not any("recall under" in line for line in model_lessons(files(tmp_path, classes, fine)))


def test_classes_without_a_test_image_are_named_not_passed_over(tmp_path):
    # The healthy model of the test above, plus 'triangle' with no test image: something to flag after all.
    classes = ["a", "b", "c", "triangle"]
    [line] = model_lessons(files(tmp_path, classes, balanced(classes[:3], 10, wrong={"b": "c"})))
    assert line.startswith("1 class of 4 with no test image: 'triangle'.") and "add images to it" in line
    guessed = balanced(classes[:3], 10, wrong={"b": "triangle"})  # predicted once, never true: still no test image
    [line] = model_lessons(files(tmp_path, classes, guessed))
    assert "'triangle'" in line and "Nothing to flag" not in line


@pytest.mark.parametrize("val_accuracy, val_loss, rising", [
    ([0.50, 0.60, 0.70, 0.80], [1.0, 0.8, 0.6, 0.5], True),
    ([0.90, 0.95, 0.95, 0.95], [0.4, 0.2, 0.2, 0.2], False),  # flat for the last epochs
    ([0.90, 0.95, 0.95, 0.952], [0.4, 0.2, 0.2, 0.2], False),  # one image more: noise, not a trend
    ([0.80, 0.90, 0.95, 0.93], [0.6, 0.4, 0.3, 0.35], False),  # the last epoch is not the best
    ([0.80, 0.85, 0.90, 0.95], [0.3, 0.4, 0.5, 0.6], False),  # val loss climbing: overconfident, not learning
], ids=["rising", "flat", "noise", "past-its-best", "loss-rising"])
def test_val_curve_still_rising_at_the_last_epoch(tmp_path, val_accuracy, val_loss, rising):
    curves = {"accuracy": {"train": val_accuracy, "val": val_accuracy},
              "loss": {"train": val_loss, "val": val_loss}}
    classes = ["a", "b"]
    lines = model_lessons(files(tmp_path, classes, balanced(classes, 10), curves))
    found = [line for line in lines if "still rising" in line]
    assert bool(found) == rising
    if rising:
        assert "0.600 at epoch 2, 0.800 at epoch 4 (+10.0 points an epoch" in found[0] and "train.epochs" in found[0]



# A real run of `dvc exp run -S train.epochs=1` on the digits (small-cnn, the default lr; CPU): under-trained, and
# one point is no curve, so neither the still-rising lesson nor "Nothing to flag" can be said.
ONE_EPOCH = {"accuracy": {"train": [0.804], "val": [0.839]}, "loss": {"train": [1.035], "val": [1.470]}}


def test_one_epoch_says_it_gives_no_curve_to_judge_rather_than_nothing_to_flag(tmp_path):
    classes = ["a", "b", "c"]
    lines = model_lessons(files(tmp_path, classes, balanced(classes, 10, wrong={"b": "c"}), ONE_EPOCH, epochs=1,
                                epochs_run=1, best_epoch=1, kept="last (epoch 1)"))
    assert not any(line.startswith("Nothing to flag") for line in lines), lines
    [line] = [line for line in lines if "1 epoch" in line]
    assert line.startswith("Trained for 1 epoch (validation accuracy 0.839, validation loss 1.470): one epoch gives "
                           "no learning curve to judge whether more epochs would help") and \
        "`dvc exp run -S train.epochs=15`" in line, line
    # Two epochs are a curve: the lessons judge it (here still rising), and say nothing about one epoch.
    two = {"accuracy": {"train": [0.804, 0.93], "val": [0.839, 0.95]}, "loss": {"train": [1.035, 0.3],
                                                                                "val": [1.470, 0.25]}}
    lines = model_lessons(files(tmp_path, classes, balanced(classes, 10), two))
    assert not any("1 epoch" in line for line in lines) and any("still rising" in line for line in lines)


def test_the_epoch_time_of_one_epoch_is_one_number():
    info = {"dataset": "digits", "counts": {"train": 1078, "val": 143, "test": 359}, "shape": [1, 8, 8],
            "num_classes": 10}
    summary = "\n".join(report.run_summary_section(run_summary(epoch_seconds=[4.744], epochs=1), info))
    assert "| wall time per epoch | 4.744 s (1 epoch) |" in summary
    summary = "\n".join(report.run_summary_section(run_summary(epoch_seconds=[1.0, 0.5]), info))
    assert "0.750 s mean over 2 epochs (first 1.000 s, min 0.500 s, max 1.000 s; 1.50 s in all)" in summary

# --- the scaling probe --------------------------------------------------------------


def test_the_probe_runs_only_where_there_is_something_to_compare():
    assert "nothing to compare" in probe_skip.nothing_to_compare(0, with_ddp=False)
    assert "analyze.probe_ddp: true" in probe_skip.nothing_to_compare(0, with_ddp=False)
    assert "one GPU is visible" in probe_skip.nothing_to_compare(1, with_ddp=True)
    assert probe_skip.nothing_to_compare(0, with_ddp=True) is None  # 1 against 2 CPU processes
    assert probe_skip.nothing_to_compare(2, with_ddp=False) is None


def probe_row(strategy: str, devices: int, batch: int, rate: float) -> dict:
    return {"strategy": strategy, "scaling": "weak", "devices": devices, "global_batch": batch,
            "per_device_batch": batch // devices, "samples_per_second": rate, "speedup": 1.0,
            "efficiency": 1.0 / devices, "peak_memory_mb": [], "note": ""}


# 1,295 images an epoch: the first epoch paid for start-up, the others ran at about 5,162 samples/s
CPU_RUN = run_summary(samples_per_second=3000.0, stage_seconds=9.0, epoch_seconds=[1.2, 0.25087, 0.25086, 0.25088])
CPU_PROBE = {"probe": "ran", "accelerator": "cpu", "device_names": ["cpu"], "steps": 10, "warmup_steps": 2,
             "per_device_batch": 64, "global_batch": 64, "seconds": 30.0, "step_seconds": 28.0, "notes": []}


def test_the_reports_rerun_advice_reruns_one_stage_without_retraining():
    """`dvc repro -f analyze` (or probe) would force check-params, prepare-data and train too."""
    note = report.missing_glyphs_note(["正"], figures.font_list_files())
    assert note.endswith("run `dvc repro -f -s analyze` (-s: that stage alone, without retraining).")
    run = replace(CPU_RUN, samples_per_second=1295 * 4 / sum(CPU_RUN.epoch_seconds))
    far = report.probe_far_from_training([probe_row("dp", 1, 64, 46.0)], run)
    assert "rerun `dvc repro -f -s probe` (-s: that stage alone, without retraining), then `dvc repro`" in far


def test_a_probe_rate_far_from_trainings_is_flagged():
    run = replace(CPU_RUN, samples_per_second=1295 * 4 / sum(CPU_RUN.epoch_seconds))
    busy = [probe_row("dp", 1, 64, 46.0), probe_row("ddp", 2, 128, 80.0)]
    text = "\n".join(report.scaling_section(CPU_PROBE, busy, run, ""))
    [line] = [line for line in text.splitlines() if "Far from training" in line]
    assert "46 samples/s" in line and "5,162 samples/s" in line and "112.2× slower" in line and "busy" in line
    quiet = [probe_row("dp", 1, 64, 4800.0), probe_row("ddp", 2, 128, 7000.0)]
    assert "Far from training" not in "\n".join(report.scaling_section(CPU_PROBE, quiet, run, ""))
    assert report.probe_far_from_training([probe_row("dp", 1, 64, 46.0)], replace(run, accumulate=2)) is None


def test_the_slow_first_epoch_lesson_needs_a_start_up_worth_naming():
    def said(run):
        return any(line.startswith("The first epoch took") for line in report.lessons(run, [], [], False, None))

    assert said(CPU_RUN)  # 1.2 s against 0.25 s
    # 0.01 s against 0.004 s is also 2x, but a few milliseconds of start-up on tiny epochs say nothing
    assert not said(replace(CPU_RUN, epoch_seconds=[0.01, 0.004, 0.004, 0.004]))


# --- run.json ---------------------------------------------------------------------


def test_a_run_json_of_another_version_is_refused_in_one_line(tmp_path):
    """analyze and the probe read run.json through RunSummary: a key missing or unknown is one line, no KeyError."""
    path = tmp_path / "run.json"
    data = asdict(run_summary())
    del data["history"]
    path.write_text(json.dumps({**data, "gpu_names": ["cpu"]}))
    with pytest.raises(UserError) as refused:
        read_run_summary(path)
    assert str(refused.value).startswith(f"{path} was written by another version of the train stage (it lacks "
                                         "history; it has unknown gpu_names); rerun `dvc repro`")
    run_summary(history=[{"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4,
                          "val_accuracy": 0.1234567}]).write(path)
    assert read_run_summary(path).curves()["accuracy"]["val"] == [0.123457]  # as DVCLive's curve has it
