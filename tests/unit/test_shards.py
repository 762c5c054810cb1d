"""Sharded teachers and sample sets: each shard is one job; the gather step checks every shard and makes the same
bytes as one job; a missing, truncated or foreign shard is refused naming it, and nothing is written."""
from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from epd.cli import main
from epd.teacher import TeacherConfig, TeacherError, gather_teacher, write_teacher

TEACHER = TeacherConfig(num_steps=3, inserted_steps=1, seeds="100-123", labels=[1, 2, 3], batch_size=4, shard_size=8)


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def test_sharded_teacher_gathers_to_the_same_bytes(tmp_path, gmm):
    write_teacher(TEACHER, tmp_path / "whole", progress=False, backbone=gmm)
    for i in range(3):
        write_teacher(TEACHER, tmp_path / "shards" / str(i), progress=False, backbone=gmm, shard=i)
    gather_teacher(tmp_path / "shards", tmp_path / "gathered", expect={"seeds": "100-123", "num_steps": 3})
    assert same_tree(tmp_path / "whole", tmp_path / "gathered")
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    with pytest.raises(ValueError, match="shard 3 does not exist: 24 seeds in shards of 8 make 3"):
        write_teacher(TEACHER, tmp_path / "x", progress=False, backbone=gmm, shard=3)


@pytest.mark.parametrize("damage, message", [
    (lambda d: __import__("shutil").rmtree(d / "1"), r"teacher shard 1 of 3 is not usable: teacher missing"),
    (lambda d: (d / "2" / "shard-00002.safetensors").write_bytes(b"cut"), r"teacher shard 2 of 3 is not usable: "
                                                                          r"teacher shard corrupt"),
    (lambda d: (d / "0" / "manifest.json").write_text("{"), r"teacher shard 0 is not usable"),
])
def test_gather_refuses_a_bad_shard_naming_it(tmp_path, gmm, damage, message):
    for i in range(3):
        write_teacher(TEACHER, tmp_path / "shards" / str(i), progress=False, backbone=gmm, shard=i)
    damage(tmp_path / "shards")
    with pytest.raises(TeacherError, match=message):
        gather_teacher(tmp_path / "shards", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gather_refuses_shards_of_another_config(tmp_path, gmm):
    for i in range(3):
        write_teacher(TEACHER, tmp_path / "shards" / str(i), progress=False, backbone=gmm, shard=i)
    with pytest.raises(TeacherError, match=r"made for another config: seeds: the shards have '100-123', the config "
                                           r"'100-131'"):
        gather_teacher(tmp_path / "shards", tmp_path / "out", expect={"seeds": "100-131"})


def _sample(tmp_path, *args) -> int:
    (tmp_path / "c.yaml").write_text("sample: {seeds: '0-9', labels: '1,2,3', batch: 2, shard_size: 4}\n")
    return main(["sample", "--config", str(tmp_path / "c.yaml"), "--solver", "euler", "--nfe", "3", "--no-progress",
                 *args])


def test_sharded_samples_gather_to_the_same_bytes_as_one_job(tmp_path):
    assert _sample(tmp_path, "--outdir", str(tmp_path / "whole")) == 0
    for i in range(3):
        assert _sample(tmp_path, "--outdir", str(tmp_path / "s" / str(i)), "--shard", str(i)) == 0
    assert _sample(tmp_path, "--outdir", str(tmp_path / "gathered"), "--gather", str(tmp_path / "s")) == 0
    assert same_tree(tmp_path / "whole", tmp_path / "gathered")
    png = tmp_path / "gathered" / "000000" / "000005.png"
    assert png.stat().st_ino == (tmp_path / "s" / "1" / "000000" / "000005.png").stat().st_ino   # linked, not copied
    assert _sample(tmp_path, "--outdir", str(tmp_path / "x"), "--shard", "3") == 2


def test_sample_gather_refuses_a_missing_or_truncated_shard(tmp_path, capsys):
    for i in range(3):
        assert _sample(tmp_path, "--outdir", str(tmp_path / "s" / str(i)), "--shard", str(i)) == 0
    png = tmp_path / "s" / "2" / "000000" / "000009.png"
    png.write_bytes(png.read_bytes()[:30])
    assert _sample(tmp_path, "--outdir", str(tmp_path / "g"), "--gather", str(tmp_path / "s")) == 2
    assert "sample shard 2: " in capsys.readouterr().err and not (tmp_path / "g").exists()
    __import__("shutil").rmtree(tmp_path / "s" / "1")
    assert _sample(tmp_path, "--outdir", str(tmp_path / "g"), "--gather", str(tmp_path / "s")) == 2
    assert "sample shard 1 of 3 missing" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_sharded_reference_gathers_with_its_record_and_serves_evaluate(tmp_path, capsys):
    """`--solver reference`: its first shard records the backbone and the reference's own error (reference.json),
    the gather keeps it, and `epd evaluate --reference` reads the backbone from it for mode_agreement."""
    (tmp_path / "c.yaml").write_text("sample: {seeds: '0-9', labels: '1,2,3', batch: 2, shard_size: 4, "
                                     "reference_steps: 16, reference_check: 3}\n"
                                     "evaluate: {metrics: [rms_to_reference, mode_agreement]}\n")
    common = ["--config", str(tmp_path / "c.yaml"), "--no-progress"]
    assert main(["sample", *common, "--solver", "reference", "--outdir", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert main(["sample", *common, "--solver", "reference", "--outdir", str(tmp_path / "s" / str(i)),
                     "--shard", str(i)]) == 0
    assert not (tmp_path / "s" / "1" / "reference.json").exists()
    assert main(["sample", *common, "--solver", "reference", "--outdir", str(tmp_path / "ref"),
                 "--gather", str(tmp_path / "s")]) == 0
    assert same_tree(tmp_path / "whole", tmp_path / "ref")
    record = __import__("json").loads((tmp_path / "ref" / "reference.json").read_text())
    assert record["backbone"] == "gmm-digits" and record["steps"] == 16 and record["samples"] == 3
    assert 0 < record["rms"] < 0.1 and record["same_mode"] == 1.0
    capsys.readouterr()
    assert main(["evaluate", *common, "--samples", str(tmp_path / "whole"), "--reference", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "e")]) == 0
    assert "rms_to_reference: 0.0000 ± 0.0000 (n=10)" in capsys.readouterr().out
