"""Exemplar sets from data columns and from folders, and the refusals that name their setting."""

import pytest

from attribution_core.errors import ConfigError, InputError
from attribution_core.evaluation.exemplar_sets import draw_sets, folder_sets


def _attributes():
    subjects = ["circle"] * 6 + ["square"] * 5 + ["cross"] * 2
    styles = ["striped", "dotted"] * 6 + [""]
    return {"subject": subjects, "style": styles}


def test_drawn_sets_share_their_value_avoid_excluded_rows_and_repeat_with_the_seed():
    attributes = _attributes()
    sets = draw_sets(attributes, {"subject": "subject", "style": "style"}, per_kind=2, size=4, seed=3, exclude={0})
    assert [s.kind for s in sets] == ["subject", "subject", "style", "style"]
    for s in sets:
        assert len(s) == 4 and len(set(s.rows)) == 4 and 0 not in s.rows
        assert {str(attributes[s.column][r]) for r in s.rows} == {s.value} and s.name == f"{s.kind}-{s.value}"
    assert {s.value for s in sets if s.kind == "subject"} == {"circle", "square"}  # cross has 2 rows: too few
    assert sets == draw_sets(attributes, {"subject": "subject", "style": "style"}, per_kind=2, size=4, seed=3,
                             exclude={0})
    assert any(a.rows != b.rows for a, b in zip(sets, draw_sets(attributes, {"subject": "subject", "style": "style"},
                                                                 per_kind=2, size=4, seed=4, exclude={0})))


def test_drawing_refuses_what_the_data_cannot_give():
    with pytest.raises(ConfigError, match=r"evaluate.exemplars.size: .*largest has 6"):
        draw_sets(_attributes(), {"subject": "subject"}, per_kind=1, size=7, seed=0)  # a set larger than the data
    with pytest.raises(ConfigError, match=r"evaluate.exemplars.columns: unknown kind 'mood'"):
        draw_sets(_attributes(), {"mood": "subject"}, per_kind=1, size=2, seed=0)
    with pytest.raises(ConfigError, match=r"evaluate.exemplars.columns.style: the data has no column 'artist'"):
        draw_sets(_attributes(), {"style": "artist"}, per_kind=1, size=2, seed=0)


def test_folder_sets_and_their_refusals(tmp_path):
    for name, files in (("my-cat", ["a.png", "b.JPG", "notes.txt"]), ("van-gogh", ["c.webp"])):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"x")
    sets = folder_sets(tmp_path, {"van-gogh": "style"})
    assert [(s.name, s.kind, len(s)) for s in sets] == [("my-cat", "general", 2), ("van-gogh", "style", 1)]
    with pytest.raises(ConfigError, match=r"evaluate.exemplars.kinds.my-cat: unknown kind 'pet'"):
        folder_sets(tmp_path, {"my-cat": "pet"})
    with pytest.raises(ConfigError, match="names sets with no folder"):
        folder_sets(tmp_path, {"monet": "style"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty holds no images"):
        folder_sets(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        folder_sets(tmp_path / "missing")
