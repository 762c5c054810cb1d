"""epd.data: seed specs, label lists and prompt files are checked whole, and each refusal names its problem."""
import pytest

from epd.data import MAX_SEEDS, labels_from_prompts, parse_labels, parse_seeds, read_prompts, seed_count


@pytest.mark.parametrize("spec, seeds", [("0-3", [0, 1, 2, 3]), ("1,5,9", [1, 5, 9]), ("0-1,10,20-21", [0, 1, 10, 20, 21]),
                                         (" 7 - 8 , 3", [7, 8, 3])])
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds
    assert seed_count(spec) == len(seeds)


@pytest.mark.parametrize("spec, message", [
    ("5-1", "seed range '5-1' runs backwards; write 1-5"),
    ("1,1,1", "names seed 1 twice"),
    ("0-9,5", "names seed 5 twice"),
    ("0-3,2-6", "names seed 2 twice"),
    ("", "empty part"),
    ("1,,2", "empty part"),
    ("a", "bad seed spec 'a'"),
    ("-3", "bad seed spec '-3'"),
    ("1-b", "bad seed spec '1-b'"),
    ("0-999999999999", f"names 1,000,000,000,000 seeds; one run takes at most {MAX_SEEDS:,}"),
    (f"{2**63}", "exceeds the largest seed"),
])
def test_parse_seeds_refuses_naming_the_part(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_seeds(spec)


def test_a_huge_range_is_refused_without_listing_it():
    """The size check comes from the range bounds, not from a list (a MemoryError before)."""
    with pytest.raises(ValueError, match="seeds; one run takes at most"):
        seed_count("0-999999999999999")


@pytest.mark.parametrize("spec, labels", [("0,1,2", [0, 1, 2]), ("7", [7]), ([3, 4], [3, 4])])
def test_parse_labels(spec, labels):
    assert parse_labels(spec) == labels


@pytest.mark.parametrize("spec, message", [("", "comma-separated integers"), ("1,x", "comma-separated integers"),
                                           ("3,12", r"digits 0-9, got \[12\]"), ([], "empty")])
def test_parse_labels_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_labels(spec)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a handwritten 3\n\nthe digit five\n")
    assert read_prompts(tmp_path / "p.txt") == ["a handwritten 3", "the digit five"]
    (tmp_path / "p.csv").write_text("id,text\n1,a handwritten 3\n")
    assert read_prompts(tmp_path / "p.csv") == ["a handwritten 3"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.csv", b"id,prompt\n1,x\n", "needs a 'text' column"),
    ("empty.txt", b"", "lists no prompts"),
    ("blank.txt", b"\n  \n\n", "lists no prompts"),
    ("latin1.txt", b"a handwritten 3\ncaf\xe9 au lait\n", r"line 2: not UTF-8 text \(byte 0xe9\)"),
    ("binary.txt", b"\xff\xfe\x00x", r"line 1: not UTF-8 text \(byte 0xff\)"),
])
def test_read_prompts_refuses_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read_prompts(tmp_path / name)
    assert str(tmp_path / name) in str(e.value)


def test_read_prompts_missing_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nothing.txt")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_prompts(tmp_path)


def test_labels_from_prompts():
    assert labels_from_prompts(["a handwritten 3", "the digit seven", "", "a picture of a cat", "NINE"]).tolist() \
        == [3, 7, -1, -1, 9]
    with pytest.raises(ValueError, match="names several digits"):
        labels_from_prompts(["3 or 4"])
