"""Confusion figures (pcb_analysis.plots) and `pcbkit plot-confusion`.

Small hand-made matrices (rows = ground truth, columns = predicted, rows sum to 1), one K = 1,203
render of the whole-matrix views, and the command on tiny statistics files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from pcb_analysis import plots
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_analysis.plots import views as plot_views
from pcb_analysis.stats import ClassStats
from pcbkit import cmd_plot_confusion as cmd
from pcbkit.cmd_plot_confusion import plot_confusion_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF-"


def make_space(k: int, seed: int = 0) -> CategorySpace:
    """K classes with LVIS-like training image counts (log-uniform in 1..20000) and r/c/f from them."""
    rng = np.random.default_rng(seed)
    counts = (np.exp(rng.uniform(0.0, np.log(20000.0), k)) + 1).astype(int)
    freq = tuple("r" if c <= 10 else "c" if c <= 100 else "f" for c in counts)
    return CategorySpace(
        ids=tuple(range(10, 10 + 3 * k, 3)),
        names=tuple(f"cls_{i}" for i in range(k)),
        frequency=freq,
        image_count=tuple(int(c) for c in counts),
    )


def random_cm(k: int, seed: int = 0) -> np.ndarray:
    """Row-stochastic matrix with a strong diagonal and Dirichlet off-diagonal noise."""
    rng = np.random.default_rng(seed)
    m = rng.dirichlet(np.full(k, 0.1), size=k) * 0.5
    m[np.arange(k), np.arange(k)] += 0.5
    return m / m.sum(axis=1, keepdims=True)


def planted_cm() -> np.ndarray:
    """K = 8: 0.6 I + 0.05 (symmetric, so D = |M - M^T| = 0), then
    - a symmetric decoy: rows 0 and 1 each move 0.25 to the other -> M[0,1] = M[1,0] = 0.30, D[0,1] = 0
      (the largest M[i,j] + M[j,i] = 0.60, but no asymmetry);
    - two planted one-way confusions: row 2 moves 0.3 of its diagonal to column 5 -> M[2,5] = 0.35,
      M[5,2] = 0.05, D[2,5] = 0.30; row 6 moves 0.2 to column 5 -> M[6,5] = 0.25, M[5,6] = 0.05,
      D[5,6] = 0.20; every other D = 0."""
    m = np.full((8, 8), 0.05) + 0.6 * np.eye(8)
    for i, j, v in ((0, 1, 0.25), (1, 0, 0.25), (2, 5, 0.3), (6, 5, 0.2)):
        m[i, i] -= v
        m[i, j] += v
    return m


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record each figure's first axes (texts, images) just before it is saved and cleared."""
    seen: list = []
    original = plot_views.save_figure

    def spy(fig, out, dpi):
        ax = fig.axes[0]
        seen.append(
            {
                "texts": [t.get_text() for t in ax.texts],
                "images": [np.ma.getdata(im.get_array()).copy() for im in ax.get_images()],
                "title": ax.get_title(),
            }
        )
        return original(fig, out, dpi)

    monkeypatch.setattr(plot_views, "save_figure", spy)
    return seen


# ------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------
def test_every_view_renders_small(tmp_path: Path) -> None:
    space = make_space(12)
    cm_a, cm_b = random_cm(12, 0), random_cm(12, 1)
    empty = np.zeros(12, dtype=bool)
    empty[4] = True
    outs = [
        plots.plot_block(cm_a, space, [0, 3, 4, 7], tmp_path / "block.png", dpi=60, empty=empty),
        plots.plot_block(cm_a, space, ["cls_1", "cls_2"], tmp_path / "block_lin.pdf", log2=False),
        plots.plot_overview(cm_a, space, tmp_path / "overview.png", dpi=60, empty=empty),
        plots.plot_zoom(cm_a, space, tmp_path / "zoom.png", dpi=60, n_rows=3, n_cols=4, empty=empty),
        plots.plot_zoom(cm_a, space, tmp_path / "zoom_given.pdf", rows=[1, 2], cols=["cls_5"]),
        plots.plot_diagonal(np.diagonal(cm_a), space, tmp_path / "diag.png", dpi=60, empty=empty),
        plots.plot_difference(cm_a, cm_b, space, tmp_path / "diff.pdf", empty_a=empty),
    ]
    for out in outs:
        data = out.read_bytes()
        magic = PNG_MAGIC if out.suffix == ".png" else PDF_MAGIC
        assert data[: len(magic)] == magic, out
        assert len(data) > 2000, out
    # nothing but the figures: no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in outs)


def test_large_k_overview_difference_diagonal(tmp_path: Path) -> None:
    """K = 1,203 (LVIS v1): one raster image per view, no per-cell text; valid non-empty PNGs."""
    k = 1203
    space = make_space(k, seed=3)
    cm_a, cm_b = random_cm(k, 3), random_cm(k, 4)
    outs = [
        plots.plot_overview(cm_a, space, tmp_path / "overview.png"),
        plots.plot_difference(cm_a, cm_b, space, tmp_path / "difference.png"),
        plots.plot_diagonal(np.diagonal(cm_a), space, tmp_path / "diagonal.png"),
    ]
    for out in outs:
        assert is_png(out)
        assert out.stat().st_size > 20_000


def test_no_cell_text_above_20_classes(tmp_path: Path, captured: list) -> None:
    space = make_space(40)
    cm = random_cm(40)
    plots.plot_block(cm, space, list(range(20)), tmp_path / "b20.png", dpi=40)
    plots.plot_block(cm, space, list(range(21)), tmp_path / "b21.png", dpi=40)
    plots.plot_zoom(cm, space, tmp_path / "z.png", rows=list(range(5)), cols=list(range(25)), dpi=40)
    plots.plot_overview(cm, space, tmp_path / "o.png", dpi=40)
    assert len(captured[0]["texts"]) == 20 * 20
    assert captured[1]["texts"] == []
    assert captured[2]["texts"] == []
    assert captured[3]["texts"] == []


def test_block_log2_values_and_floor(tmp_path: Path, captured: list) -> None:
    """Cell text is log2 M with one decimal; zeros sit at the floor (2^-20 -> -20.0)."""
    space = make_space(3)
    cm = np.array([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.0, 0.125, 0.875]])
    plots.plot_block(cm, space, [0, 1, 2], tmp_path / "b.png")
    img = captured[0]["images"][0]
    # log2 0.5 = -1, log2 0.25 = -2, log2 0.125 = -3, log2 0 -> floor -20
    assert img[0, 0] == -1.0 and img[1, 0] == -2.0 and img[2, 1] == -3.0 and img[0, 2] == -20.0
    assert captured[0]["texts"][:3] == ["-1.0", "-1.0", "-20.0"]


def test_overview_is_sorted_by_training_frequency(tmp_path: Path, captured: list) -> None:
    space = CategorySpace(
        ids=(1, 2, 3, 4),
        names=("a", "b", "c", "d"),
        frequency=("r", "f", "c", "f"),
        image_count=(3, 500, 50, 2000),
    )
    # order by image count desc: d(3), b(1), c(2), a(0)
    assert plots.frequency_order(space).tolist() == [3, 1, 2, 0]
    cm = np.diag([0.5, 0.25, 0.125, 1.0])
    cm[:, 0] += 1.0 - cm.sum(axis=1)  # rows sum to 1
    plots.plot_overview(cm, space, tmp_path / "o.png")
    img = captured[0]["images"][0]
    # diagonal in sorted order: log2 of M[d,d]=1, M[b,b]=0.25, M[c,c]=0.125, M[a,a]=1 (0.5 + 0.5)
    assert np.diagonal(img).tolist() == [0.0, -2.0, -3.0, 0.0]


def test_failed_render_keeps_previous_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    out = tmp_path / "fig.png"
    out.write_bytes(b"previous good figure")

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        plots.plot_overview(random_cm(5), make_space(5), out)
    assert out.read_bytes() == b"previous good figure"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_bad_inputs(tmp_path: Path) -> None:
    space = make_space(5)
    cm = random_cm(5)
    with pytest.raises(PcbkitError, match="png or .pdf"):
        plots.plot_overview(cm, space, tmp_path / "fig.jpg")
    with pytest.raises(PcbkitError, match="does not match the category space"):
        plots.plot_overview(random_cm(6), space, tmp_path / "fig.png")
    bad = cm.copy()
    bad[0, 0] = np.nan
    with pytest.raises(PcbkitError, match="NaN"):
        plots.plot_block(bad, space, [0, 1], tmp_path / "fig.png")
    with pytest.raises(PcbkitError, match="did you mean cls_1"):
        plots.plot_block(cm, space, ["cls_1x"], tmp_path / "fig.png")
    assert not list(tmp_path.iterdir())


def test_resolve_classes() -> None:
    space = make_space(5)  # LVIS ids 10, 13, 16, 19, 22
    assert plots.resolve_classes(space, ["cls_3", 0, "id:13"]) == [3, 0, 1]
    with pytest.raises(PcbkitError, match="index 7"):
        plots.resolve_classes(space, [7])
    with pytest.raises(PcbkitError, match="'id:11'"):
        plots.resolve_classes(space, ["id:11"])
    with pytest.raises(PcbkitError, match="more than once"):
        plots.resolve_classes(space, ["cls_0", 0])


# ------------------------------------------------------------------------------------------
# block selection
# ------------------------------------------------------------------------------------------
def test_most_confused_recovers_planted_pairs() -> None:
    space = make_space(8)
    cm = planted_cm()
    # D = |M - M^T|: D[2,5] = 0.30 is the maximum -> seed pair (2, 5) in pick order;
    # gain of c = D[c,2] + D[c,5]: class 6 gains 0.20, every other class 0 -> third pick is 6.
    # (The symmetric decoy (0, 1) has the largest M[i,j] + M[j,i] but no asymmetry: not picked.)
    assert plots.select_block(cm, space, 2, "most-confused") == [2, 5]
    assert plots.select_block(cm, space, 3, "most-confused") == [2, 5, 6]
    # A({2,5,6}) = D[2,5] + D[2,6] + D[5,6] = 0.30 + 0 + 0.20
    assert plots.asymmetric_mass(cm, [2, 5, 6]) == pytest.approx(0.5)
    # an empty class is skipped: without 2 the most asymmetric pair is (5, 6)
    empty = np.zeros(8, dtype=bool)
    empty[2] = True
    assert plots.select_block(cm, space, 2, "most-confused", empty=empty) == [5, 6]


def test_most_confused_property_beats_random() -> None:
    """The greedy block's asymmetric mass is at least that of any random block of the same size."""
    space = make_space(60, seed=1)
    cm = random_cm(60, seed=1)
    best = plots.asymmetric_mass(cm, plots.select_block(cm, space, 6, "most-confused"))
    for seed in range(20):
        assert best >= plots.asymmetric_mass(cm, plots.select_block(cm, space, 6, "random", seed=seed))


def test_frequent_rare_random_selection() -> None:
    space = CategorySpace(
        ids=(1, 2, 3, 4, 5),
        names=tuple("abcde"),
        frequency=("r", "f", "c", "f", "r"),
        image_count=(3, 500, 50, 2000, 1),
    )
    cm = random_cm(5)
    assert plots.select_block(cm, space, 2, "frequent") == [3, 1]
    assert plots.select_block(cm, space, 2, "rare") == [4, 0]
    empty = np.array([False, False, False, False, True])
    assert plots.select_block(cm, space, 2, "rare", empty=empty) == [0, 2]
    big = make_space(100)
    a = plots.select_block(random_cm(100), big, 10, "random", seed=7)
    assert a == plots.select_block(random_cm(100), big, 10, "random", seed=7)
    assert a != plots.select_block(random_cm(100), big, 10, "random", seed=8)
    assert a == sorted(a) and len(set(a)) == 10
    with pytest.raises(PcbkitError, match="between 1 and"):
        plots.select_block(cm, space, 6, "random")
    with pytest.raises(PcbkitError, match="expected one of"):
        plots.select_block(cm, space, 2, "worst")  # type: ignore[arg-type]


def test_head_tail_slice_finds_rare_rows_confused_with_frequent() -> None:
    space = CategorySpace(
        ids=(1, 2, 3, 4, 5, 6),
        names=tuple("abcdef"),
        frequency=("f", "f", "f", "r", "r", "r"),
        image_count=(900, 800, 700, 5, 4, 3),
    )
    cm = np.eye(6)
    cm[4] = [0.0, 0.6, 0.0, 0.0, 0.4, 0.0]  # rare e -> frequent b
    cm[5] = [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]  # rare f -> frequent a (less)
    rows, cols = plots.select_head_tail(cm, space, n_rows=2, n_cols=2)
    # row masses to frequent columns: e 0.6, f 0.1, d 0.0 -> {e, f}; columns b 0.6, a 0.1 -> {a, b}
    assert rows == [4, 5] and cols == [0, 1]


# ------------------------------------------------------------------------------------------
# top confused pairs
# ------------------------------------------------------------------------------------------
FOUR = np.array(
    [
        [0.70, 0.20, 0.10, 0.00],
        [0.05, 0.90, 0.05, 0.00],
        [0.30, 0.00, 0.60, 0.10],
        [0.00, 0.00, 0.25, 0.75],
    ]
)


def test_top_pairs_order_and_columns(tmp_path: Path) -> None:
    space = CategorySpace(
        ids=(1, 7, 9, 12),
        names=("ant", "bee", "cat", "dog"),
        frequency=("f", "c", "r", "f"),
        image_count=(400, 40, 4, 4000),
    )
    table = plots.top_confused_pairs(FOUR, space, n=5)
    assert list(table.columns) == list(plots.PAIR_COLUMNS)
    # off-diagonal M[i,j] > 0, by M desc then asymmetry desc:
    # (2,0) 0.30 asym +0.20 | (3,2) 0.25 asym +0.15 | (0,1) 0.20 asym +0.15 |
    # 0.10 tie: (2,3) asym 0.10-0.25 = -0.15 before (0,2) asym 0.10-0.30 = -0.20 | then cut at n=5
    assert list(zip(table.i, table.j, strict=True)) == [(2, 0), (3, 2), (0, 1), (2, 3), (0, 2)]
    assert table.M_ij.tolist() == pytest.approx([0.30, 0.25, 0.20, 0.10, 0.10])
    assert table.M_ji.tolist() == pytest.approx([0.10, 0.10, 0.05, 0.25, 0.30])
    assert table.asymmetry.tolist() == pytest.approx([0.20, 0.15, 0.15, -0.15, -0.20])
    first = table.iloc[0]
    assert (first.name_i, first.name_j, first.cat_id_i, first.cat_id_j) == ("cat", "ant", 9, 1)
    assert (first.frequency_i, first.frequency_j, first.image_count_i, first.image_count_j) == (
        "r",
        "f",
        4,
        400,
    )
    assert table["rank"].tolist() == [1, 2, 3, 4, 5]

    # all 7 positive off-diagonal entries when n is larger; the 0.05 tie: (1,2) asym +0.05 before (1,0) -0.15
    full = plots.top_confused_pairs(FOUR, space, n=50)
    assert list(zip(full.i, full.j, strict=True))[5:] == [(1, 2), (1, 0)]
    # rows of empty classes are left out
    empty = np.array([False, False, True, False])
    assert 2 not in plots.top_confused_pairs(FOUR, space, n=50, empty=empty).i.tolist()

    out = plots.write_top_pairs_csv(table, tmp_path / "pairs.csv")
    back = pd.read_csv(out)
    assert list(back.columns) == list(plots.PAIR_COLUMNS)
    assert back.name_i.tolist() == ["cat", "dog", "ant", "cat", "ant"]
    assert back.M_ij.tolist() == pytest.approx(table.M_ij.tolist())
    with pytest.raises(PcbkitError, match=".csv"):
        plots.write_top_pairs_csv(table, tmp_path / "pairs.txt")


def test_top_pairs_identity_has_no_pairs() -> None:
    table = plots.top_confused_pairs(np.eye(3), make_space(3), n=10)
    assert len(table) == 0 and list(table.columns) == list(plots.PAIR_COLUMNS)


# ------------------------------------------------------------------------------------------
# command
# ------------------------------------------------------------------------------------------
def test_command_module_imports_light() -> None:
    code = (
        "import sys, pcbkit.cmd_plot_confusion as m; "
        "bad = [x for x in ('matplotlib', 'numpy', 'torch', 'pandas') if x in sys.modules]; "
        "assert not bad, bad; print(m.plot_confusion_cmd.name)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "plot-confusion"


def test_command_choices_match_library() -> None:
    assert cmd.SELECTIONS == plots.SELECTIONS
    assert cmd.ALL_VIEWS == plots.VIEWS


def write_stats(
    path: Path, m: np.ndarray, space: CategorySpace | None, empty: tuple[int, ...] = (), split: str = "val"
) -> Path:
    """Statistics whose confusion matrix is `m`: one positive of class i with foreground logits log M[i]
    (so its foreground softmax p is exactly row i); classes in `empty` get no positive."""
    k = m.shape[0]
    rows = [i for i in range(k) if i not in empty]
    logits = torch.full((len(rows), k + 1), -30.0, dtype=torch.float64)
    logits[:, :k] = torch.log(torch.from_numpy(m[rows]).clamp_min(1e-13))
    st = ClassStats.zeros(k)
    st.update(logits, torch.tensor(rows, dtype=torch.int64))
    if space is not None:
        st.categories = space
    st.split = split
    st.save(path)
    return path


@pytest.fixture
def stats_file(tmp_path: Path) -> Path:
    pytest.importorskip("pcb_analysis.stats")
    return write_stats(tmp_path / "val.npz", planted_cm(), make_space(8), empty=(0,))


def invoke(args: list[str]):
    return CliRunner().invoke(plot_confusion_cmd, args)


def test_cli_block_default(stats_file: Path) -> None:
    res = invoke(["--stats", str(stats_file)])
    assert res.exit_code == 0, res.output
    out = stats_file.with_name("val-block.png")
    assert is_png(out)
    # most-confused by default: the planted pair (2, 5) then 6 first
    assert "block (most-confused): cls_2, cls_5, cls_6" in res.output
    assert f"wrote {out}" in res.output


def test_cli_all_views_compare_and_pairs(stats_file: Path, tmp_path: Path) -> None:
    other = write_stats(tmp_path / "train.npz", random_cm(8, 5), make_space(8), split="train")
    csv = tmp_path / "pairs.csv"
    res = invoke(
        [
            "--stats",
            str(stats_file),
            "--view",
            "all",
            "--compare",
            str(other),
            "--classes",
            "4",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "fig.pdf"),
            "--pairs-csv",
            str(csv),
            "--pairs",
            "3",
        ]
    )
    assert res.exit_code == 0, res.output
    for view in ("block", "overview", "diagonal", "head-tail", "difference"):
        assert (tmp_path / f"fig-{view}.pdf").read_bytes()[:5] == PDF_MAGIC, view
    table = pd.read_csv(csv)
    assert len(table) == 3 and list(table.columns) == list(plots.PAIR_COLUMNS)
    # class 0 has no positives, so no pair starts at it; the largest entry is the planted M[2,5] = 0.35
    assert (table.i.iloc[0], table.j.iloc[0]) == (2, 5) and table.M_ij.iloc[0] == pytest.approx(0.35)
    assert "block (random)" in res.output


def test_cli_class_names(stats_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "named.png"
    res = invoke(
        ["--stats", str(stats_file), "--class-names", "cls_3,cls_1, cls_7", "--no-log2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "block (given): cls_3, cls_1, cls_7" in res.output and is_png(out)


def test_cli_without_category_space(tmp_path: Path) -> None:
    pytest.importorskip("pcb_analysis.stats")
    path = write_stats(tmp_path / "bare.npz", planted_cm(), None)
    res = invoke(["--stats", str(path), "--view", "overview"])
    assert res.exit_code == 0, res.output
    assert is_png(tmp_path / "bare-overview.png")
    res = invoke(["--stats", str(path), "--view", "diagonal"])
    assert isinstance(res.exception, PcbkitError) and "--categories" in str(res.exception)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "9"], "larger than the number of classes K=8"),
        (["--class-names", "cls_2,kangaroo"], "unknown class(es): 'kangaroo'"),
        (["--out", "fig.jpg"], "must be .png or .pdf"),
        (["--view", "difference"], "needs --compare"),
        (["--select", "rare", "--seed", "1"], "--seed only applies"),
        (["--pairs-csv", "pairs.xlsx"], "must be .csv"),
    ],
)
def test_cli_bad_input(stats_file: Path, extra: list[str], message: str) -> None:
    before = sorted(p.name for p in stats_file.parent.iterdir())
    res = invoke(["--stats", str(stats_file), *extra])
    assert isinstance(res.exception, PcbkitError), res.output
    assert message in str(res.exception) and "\n" not in str(res.exception)
    assert sorted(p.name for p in stats_file.parent.iterdir()) == before  # nothing written


def test_cli_missing_file_and_mismatched_compare(stats_file: Path, tmp_path: Path) -> None:
    res = invoke(["--stats", str(tmp_path / "nope.npz")])
    assert isinstance(res.exception, PcbkitError) and "nope.npz: statistics file not found" in str(
        res.exception
    )
    other = write_stats(tmp_path / "other.npz", planted_cm(), make_space(8, seed=9))
    space_9 = make_space(8, seed=9)
    assert space_9.hash != make_space(8).hash  # r/c/f differ
    res = invoke(["--stats", str(stats_file), "--view", "difference", "--compare", str(other)])
    assert isinstance(res.exception, PcbkitError) and "category space mismatch" in str(res.exception)
    smaller = write_stats(tmp_path / "k5.npz", random_cm(5), make_space(5))
    res = invoke(["--stats", str(stats_file), "--view", "difference", "--compare", str(smaller)])
    assert isinstance(res.exception, PcbkitError) and "K=5" in str(res.exception)


# ------------------------------------------------------------------------------------------
# the regime line under the titles
# ------------------------------------------------------------------------------------------
def test_subtitles_go_under_every_view_title(tmp_path: Path, captured: list) -> None:
    space = make_space(12)
    cm = random_cm(12)
    paths = {v: tmp_path / f"{v}.png" for v in plots.VIEWS}
    plots.render_views(paths, plots.Matrix(cm), space, difference=(plots.Matrix(cm), plots.Matrix(cm)),
                       subtitles={v: f"regime of {v}" for v in plots.VIEWS}, titles={"block": "B"})
    titles = [c["title"] for c in captured]
    assert len(titles) == len(plots.VIEWS)
    for view, title in zip(plots.VIEWS, titles, strict=True):
        assert title.endswith(f"\nregime of {view}"), (view, title)
    assert titles[0] == "B\nregime of block"  # an explicit title keeps its subtitle
    assert plot_views.with_subtitle("T", None) == "T" and plot_views.with_subtitle("T", "") == "T"


def test_cli_titles_carry_the_regime(stats_file: Path, tmp_path: Path, captured: list) -> None:
    other = write_stats(tmp_path / "train.npz", random_cm(8, 5), make_space(8), split="train")
    res = invoke(["--stats", str(stats_file), "--view", "all", "--compare", str(other),
                  "--out", str(tmp_path / "f.png")])
    assert res.exit_code == 0, res.output
    # independent of the library: M with an identity row for the empty class 0, cond_2 by numpy, and the
    # mean diagonal of each bucket over its classes with positives
    m = planted_cm()
    m[0] = np.eye(8)[0]
    cond = np.linalg.cond(m)
    freq = np.array(make_space(8).frequency)
    has = np.arange(8) != 0
    diags = ["-" if not (has & (freq == b)).any() else f"{np.diagonal(m)[has & (freq == b)].mean():.2f}"
             for b in "rcf"]
    mant, exp = f"{cond:.1e}".split("e")
    cond_text = f"{cond:.3g}" if cond < 1000 else f"{mant}e{int(exp)}"
    want = f"cond {cond_text} · diag r/c/f {'/'.join(diags)}"
    titles = {c["title"].split("\n")[0][:20]: c["title"] for c in captured}
    main_titles = [t for t in titles.values() if not t.startswith("Confusion difference")]
    assert main_titles and all(t.split("\n")[1] == want for t in main_titles), (want, main_titles)
    diff = next(t for t in titles.values() if t.startswith("Confusion difference"))
    assert diff.split("\n")[1] == f"val: {want}" and diff.split("\n")[2].startswith("train: cond ")
