"""The solver table format: round trips, atomic saving, and a refusal with its own message for each malformed file.

Malformed files are written by hand (``safetensors.torch.save_file`` + plain ``json``), bypassing ``save_table``'s
validation, with the checksum recomputed so that the check under test fires rather than the checksum one.
Nothing in this file unpickles: pickles are only written, and the ``no_unpickling`` fixture makes any attempt to read
one fail loudly.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import epd
from epd.solvers import SolverTable, TableError, TableMeta, handset_table, load_table, save_table
from epd.solvers import table as table_mod

S, K, B = 4, 3, 2  # steps, points per step, samples (num_steps = S + 1)


# ----------------------------------------------------------------------------------------------------------------- helpers
def make_table(batched: bool = False, plugin: bool = False, seed: int = 0) -> SolverTable:
    """A valid, non-trivial table (random sorted positions, random simplex weights, scales within the bound)."""
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if batched else ()
    shape = (*lead, S, K)
    positions = torch.sort(torch.rand(shape, generator=g) * 0.9 + 0.05, dim=-1).values
    weights = torch.softmax(torch.randn(shape, generator=g), dim=-1)
    bound = 0.1
    scale_dir = 1 + bound * (2 * torch.rand(shape, generator=g) - 1) * 0.99
    scale_time = 1 + bound * (2 * torch.rand(shape, generator=g) - 1) * 0.99
    meta = TableMeta(
        num_steps=S + 1, num_points=K, schedule="logsnr", sigma_min=0.01, sigma_max=50.0, afs=not plugin,
        plugin=plugin, plugin_order=3, scale_bound=bound, backbone="gmm-test", guidance=1.5,
    )
    return SolverTable(positions, weights, scale_dir, scale_time, meta).validate()


def good_parts(batched: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    t = make_table(batched)
    return {k: v.clone() for k, v in t.tensors().items()}, t.meta.to_json()


def write_raw(stem: Path, tensors: dict[str, torch.Tensor] | None, meta: dict | None, *, header: dict | None = None,
              sha: str | None = None) -> Path:
    """Write NAME.safetensors / NAME.json directly, bypassing validation; the sha256 is recomputed unless given."""
    st_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(st_path))
    h = {
        "format": table_mod.FORMAT,
        "format_version": table_mod.FORMAT_VERSION,
        "tensors_file": st_path.name,
        "tensors_sha256": sha if sha is not None else (
            hashlib.sha256(st_path.read_bytes()).hexdigest() if st_path.exists() else "0" * 64),
        "meta": meta,
    }
    h.update(header or {})
    json_path.write_text(json.dumps(h, indent=2))
    return json_path


def rehash(stem: Path) -> None:
    """Make the JSON's checksum match the tensor file as it is now."""
    json_path = stem.with_name(stem.name + ".json")
    h = json.loads(json_path.read_text())
    h["tensors_sha256"] = hashlib.sha256(stem.with_name(stem.name + ".safetensors").read_bytes()).hexdigest()
    json_path.write_text(json.dumps(h))


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt (by epd or by this test) to unpickle fails the test instead of running pickled code."""
    def boom(*a, **k):
        raise AssertionError("something tried to unpickle")

    class NoUnpickler:
        def __init__(self, *a, **k):
            boom()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", boom)


# -------------------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("plugin", [False, True], ids=["epd", "plugin"])
@pytest.mark.parametrize("form", ["json", "safetensors", "stem"])
def test_round_trip(tmp_path, batched, plugin, form):
    t = make_table(batched, plugin)
    json_path = save_table(t, tmp_path / "tab")
    assert json_path == tmp_path / "tab.json"
    assert sorted(os.listdir(tmp_path)) == ["tab.json", "tab.safetensors"]  # no stray temporary files

    arg = {"json": tmp_path / "tab.json", "safetensors": tmp_path / "tab.safetensors", "stem": tmp_path / "tab"}[form]
    u = load_table(str(arg) if form == "stem" else arg)
    assert u.meta == t.meta
    for name, v in t.tensors().items():
        w = getattr(u, name)
        assert w.dtype == torch.float32 and w.shape == v.shape
        assert torch.equal(w, v), name
    assert u.positions.shape == ((B, S, K) if batched else (S, K))
    assert u.meta.plugin is plugin


@pytest.mark.parametrize("given", ["json", "safetensors"])
def test_save_accepts_any_suffix_form(tmp_path, given):
    t = make_table()
    assert save_table(t, tmp_path / f"tab.{given}") == tmp_path / "tab.json"
    assert sorted(os.listdir(tmp_path)) == ["tab.json", "tab.safetensors"]


def test_json_is_plain_and_documented(tmp_path):
    t = make_table(plugin=True)
    save_table(t, tmp_path / "tab")
    h = json.loads((tmp_path / "tab.json").read_text())  # plain json, no epd code involved
    assert set(h) == {"format", "format_version", "tensors_file", "tensors_sha256", "meta"}
    assert h["format"] == "epd-solver-table" and h["format_version"] == 1
    assert h["tensors_file"] == "tab.safetensors"
    assert h["tensors_sha256"] == hashlib.sha256((tmp_path / "tab.safetensors").read_bytes()).hexdigest()
    meta = h["meta"]
    expected_keys = {
        "num_steps", "num_points", "schedule", "sigma_min", "sigma_max", "rho", "schedule_args", "afs", "plugin",
        "plugin_order", "scale_bound", "backbone", "guidance", "afs_convention", "grid", "nfe",
    }
    assert set(meta) == expected_keys
    assert meta["nfe"] == 2 * (meta["num_steps"] - 1) - int(meta["afs"]) == t.meta.nfe
    assert meta["plugin"] is True and meta["backbone"] == "gmm-test" and meta["num_points"] == K


def test_save_goes_through_a_temporary_name(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        assert Path(src).exists() and Path(src).parent == Path(dst).parent
        return real_replace(src, dst)

    monkeypatch.setattr(table_mod.os, "replace", spy)
    save_table(make_table(), tmp_path / "tab")
    assert sorted(d.name for _, d in renames) == ["tab.json", "tab.safetensors"]
    for src, dst in renames:
        assert src != dst and src.name.startswith(".") and ".tmp-" in src.name
    assert sorted(os.listdir(tmp_path)) == ["tab.json", "tab.safetensors"]


def test_overwrite_with_a_good_table_replaces_it(tmp_path):
    save_table(make_table(seed=0), tmp_path / "tab")
    t2 = make_table(seed=1)
    save_table(t2, tmp_path / "tab")
    assert torch.equal(load_table(tmp_path / "tab").positions, t2.positions)
    assert sorted(os.listdir(tmp_path)) == ["tab.json", "tab.safetensors"]


@pytest.mark.parametrize("breakage", ["nan", "unordered", "bad_meta"])
def test_saving_an_invalid_table_leaves_existing_files_untouched(tmp_path, breakage):
    save_table(make_table(), tmp_path / "tab")
    before = snapshot(tmp_path)
    bad = make_table(seed=3)
    if breakage == "nan":
        bad.positions[0, 0] = float("nan")
        match = "positions contains NaN"
    elif breakage == "unordered":
        bad.positions[1] = bad.positions[1].flip(-1)
        match = "strictly increasing"
    else:
        bad.meta = TableMeta(num_steps=S + 2, num_points=K)
        match = "wrong shape"
    with pytest.raises(TableError, match=match):
        save_table(bad, tmp_path / "tab")
    assert snapshot(tmp_path) == before  # same names (no temporaries), same bytes
    load_table(tmp_path / "tab")


def test_own_grid_round_trips_and_is_the_grid(tmp_path):
    """A table may carry its own grid (learned, or imported from upstream); sigmas() is then exactly that grid."""
    t = make_table()
    grid = [50.0, 7.25, 0.7310585786300049, 0.0913, 0.01]
    t.meta = TableMeta(**{**{k: v for k, v in t.meta.to_json().items() if k != "nfe"}, "grid": grid,
                          "schedule": "explicit"})
    save_table(t, tmp_path / "tab")
    u = load_table(tmp_path / "tab")
    assert u.meta.grid == grid and u.meta.schedule == "explicit"
    assert torch.equal(u.meta.sigmas(), torch.tensor(grid, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------ malformed tables
def test_raw_writer_makes_loadable_tables(tmp_path):
    """Control: the hand-written files load, so each failure below is due to its one defect."""
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, meta)
    t = load_table(tmp_path / "tab")
    assert torch.equal(t.weights, tensors["weights"])


def test_truncated_tensor_file(tmp_path):
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, meta)
    st = tmp_path / "tab.safetensors"
    st.write_bytes(st.read_bytes()[:-17])
    rehash(tmp_path / "tab")
    with pytest.raises(TableError, match="not a readable safetensors file"):
        load_table(tmp_path / "tab")


def test_tensor_file_truncated_to_its_header_size(tmp_path):
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, meta)
    st = tmp_path / "tab.safetensors"
    st.write_bytes(st.read_bytes()[:5])
    rehash(tmp_path / "tab")
    with pytest.raises(TableError, match="not a readable safetensors file"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "binary"])
def test_truncated_or_corrupt_json(tmp_path, damage):
    tensors, meta = good_parts()
    jp = write_raw(tmp_path / "tab", tensors, meta)
    text = jp.read_text()
    if damage == "truncated":
        jp.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        jp.write_text("{\"format\": epd-solver-table,,}")
    else:
        jp.write_bytes(b"\xff\xfe\x00{not json")
    with pytest.raises(TableError, match="is not valid JSON"):
        load_table(tmp_path / "tab")


def test_json_of_another_kind(tmp_path):
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, meta, header={"format": "something-else"})
    with pytest.raises(TableError, match="is not an epd solver table"):
        load_table(tmp_path / "tab")
    (tmp_path / "tab.json").write_text("[1, 2, 3]")
    with pytest.raises(TableError, match="is not an epd solver table"):
        load_table(tmp_path / "tab")


def test_unsupported_format_version(tmp_path):
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, meta, header={"format_version": 99})
    with pytest.raises(TableError, match="unsupported format_version 99"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("name", ["positions", "weights", "scale_dir", "scale_time"])
def test_nan_in_a_tensor(tmp_path, name, batched):
    tensors, meta = good_parts(batched)
    tensors[name][..., 1, 0] = float("nan")
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match=f"^{name} contains NaN$"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", ["positions", "weights", "scale_dir", "scale_time"])
def test_inf_in_a_tensor(tmp_path, name, sign):
    tensors, meta = good_parts()
    tensors[name][2, 1] = sign * float("inf")
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match=f"^{name} contains inf$"):
        load_table(tmp_path / "tab")


def test_wrong_shape_k_mismatch(tmp_path):
    tensors, meta = good_parts()
    meta = {**meta, "num_points": K + 1}
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match=r"wrong shape: positions has shape \(4, 3\).*num_points=4"):
        load_table(tmp_path / "tab")


def test_wrong_shape_num_steps_mismatch(tmp_path):
    tensors, meta = good_parts()
    meta = {**meta, "num_steps": 7, "nfe": 2 * 6 - int(meta["afs"])}  # consistent nfe, so the shape check fires
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match=r"wrong shape: .*expected \[\(B,\) 6, 3\] for num_steps=7"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize("bad", ["1d", "4d"])
def test_wrong_number_of_dimensions(tmp_path, bad):
    tensors, meta = good_parts()
    tensors["weights"] = tensors["weights"].reshape(-1) if bad == "1d" else tensors["weights"][None, None]
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match="wrong shape: weights"):
        load_table(tmp_path / "tab")


def test_tensors_of_different_shapes(tmp_path):
    tensors, meta = good_parts()
    tensors["scale_time"] = tensors["scale_time"].expand(B, S, K).clone()
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match="must share one shape"):
        load_table(tmp_path / "tab")


def test_weights_not_summing_to_one(tmp_path):
    tensors, meta = good_parts()
    tensors["weights"][1] *= 1.01
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match="weights off the simplex: a step's weights do not sum to 1"):
        load_table(tmp_path / "tab")


def test_negative_weight(tmp_path):
    tensors, meta = good_parts(batched=True)
    tensors["weights"][1, 2] = torch.tensor([-0.25, 0.5, 0.75])  # sums to 1, but one is negative
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match="weights off the simplex: some weight is negative"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize("row", [[0.6, 0.3, 0.8], [0.3, 0.3, 0.8]], ids=["swapped", "tied"])
def test_unordered_positions(tmp_path, row):
    tensors, meta = good_parts()
    tensors["positions"][2] = torch.tensor(row)
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match="strictly increasing within each step"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize("row", [[0.0, 0.5, 0.9], [0.2, 0.5, 1.0], [-0.1, 0.5, 0.9], [0.2, 0.5, 1.3]])
def test_positions_outside_unit_interval(tmp_path, row):
    tensors, meta = good_parts()
    tensors["positions"][0] = torch.tensor(row)
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match=r"positions must lie strictly inside \(0, 1\)"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize("value", [1.2, 0.85])
@pytest.mark.parametrize("name", ["scale_dir", "scale_time"])
def test_scale_out_of_bounds(tmp_path, name, value):
    tensors, meta = good_parts()  # scale_bound = 0.1
    tensors[name][3, 2] = value
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match=rf"{name} must lie in \[1 - 0.1, 1 \+ 0.1\] \(scale_bound\)"):
        load_table(tmp_path / "tab")


def test_metadata_nfe_inconsistent(tmp_path):
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, {**meta, "nfe": meta["nfe"] + 1})
    with pytest.raises(TableError, match=r"metadata mismatch: nfe=\d+ but num_steps=5, afs=True give 7"):
        load_table(tmp_path / "tab")
    write_raw(tmp_path / "tab", tensors, {**meta, "afs": not meta["afs"]})  # nfe no longer matches afs
    with pytest.raises(TableError, match="metadata mismatch: nfe=7 but num_steps=5, afs=False give 8"):
        load_table(tmp_path / "tab")


@pytest.mark.parametrize(
    "expect, match",
    [
        ({"num_steps": 7}, "metadata mismatch: table has num_steps=5, expected 7"),
        ({"backbone": "other"}, "metadata mismatch: table has backbone='gmm-test', expected 'other'"),
        ({"nfe": 8}, "metadata mismatch: table has nfe=7, expected 8"),
        ({"guidance": 2.0}, "metadata mismatch: table has guidance=1.5, expected 2.0"),
        ({"backbone": 1.5}, "metadata mismatch: table has backbone='gmm-test', expected 1.5"),
        ({"no_such_key": 1}, "metadata mismatch: table has no_such_key=None, expected 1"),
    ],
)
def test_expect_mismatch(tmp_path, expect, match):
    save_table(make_table(), tmp_path / "tab")
    with pytest.raises(TableError, match=re.escape(match)):
        load_table(tmp_path / "tab", expect=expect)


def test_expect_match(tmp_path):
    save_table(make_table(), tmp_path / "tab")
    t = load_table(tmp_path / "tab", expect={
        "num_steps": 5, "num_points": K, "backbone": "gmm-test", "nfe": 7, "guidance": 1.5 + 1e-9,
        "schedule": "logsnr", "plugin": False,
    })
    assert t.meta.num_steps == 5


@pytest.mark.parametrize(
    "change, match",
    [
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"num_steps": None}, "wrong type: num_steps=None"),
        ({"num_steps": "5"}, "wrong type: num_steps='5'"),
        ({"num_points": 3.0}, "wrong type: num_points=3.0"),
        ({"afs": "yes"}, "wrong type: afs='yes'"),
        ({"sigma_min": "0.01"}, "wrong type: sigma_min='0.01'"),
        ({"schedule_args": []}, r"wrong type: schedule_args=\[\]"),
        ({"schedule": "nope"}, "unknown schedule 'nope'"),
        ({"plugin_order": 5}, "plugin_order must be 1-4"),
        ({"scale_bound": 1.5}, r"scale_bound must be in \[0, 1\)"),
        ({"afs_convention": "other"}, "afs_convention must be one of"),
        ({"schedule": "explicit"}, "needs the table's own grid"),
        ({"grid": [50.0, 1.0, 0.01]}, "grid must list num_steps=5 numbers"),
        ({"grid": [50.0, 2.0, 3.0, 1.0, 0.01]}, "strictly decreasing"),
        ({"grid": [50.0, 3.0, 2.0, 1.0, 0.0]}, "positive"),
        ({"grid": [40.0, 3.0, 2.0, 1.0, 0.01]}, "sigma_max=50.0"),
        ({"grid": "50,1"}, "wrong type: grid='50,1'"),
    ],
)
def test_bad_metadata_values(tmp_path, change, match):
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, {**meta, **change})
    with pytest.raises(TableError, match=match):
        load_table(tmp_path / "tab")


def test_metadata_incomplete_or_not_an_object(tmp_path):
    tensors, meta = good_parts()
    write_raw(tmp_path / "tab", tensors, {k: v for k, v in meta.items() if k != "num_points"})
    with pytest.raises(TableError, match="table metadata is incomplete"):
        load_table(tmp_path / "tab")
    write_raw(tmp_path / "tab", tensors, [1, 2])
    with pytest.raises(TableError, match="table metadata must be a JSON object"):
        load_table(tmp_path / "tab")


def test_missing_tensor_file(tmp_path):
    save_table(make_table(), tmp_path / "tab")
    (tmp_path / "tab.safetensors").unlink()
    for form in ("tab", "tab.json", "tab.safetensors"):
        with pytest.raises(TableError, match=r"table file missing: .*tab\.safetensors"):
            load_table(tmp_path / form)


def test_missing_json_file(tmp_path):
    save_table(make_table(), tmp_path / "tab")
    (tmp_path / "tab.json").unlink()
    with pytest.raises(TableError, match=r"table file missing: .*tab\.json"):
        load_table(tmp_path / "tab.safetensors")


def test_nothing_there(tmp_path):
    with pytest.raises(TableError, match="table file missing"):
        load_table(tmp_path / "nope")


def test_tensor_missing_from_file(tmp_path):
    tensors, meta = good_parts()
    del tensors["scale_time"]
    write_raw(tmp_path / "tab", tensors, meta)
    with pytest.raises(TableError, match=r"lacks tensors \['scale_time'\]"):
        load_table(tmp_path / "tab")


def test_tensor_file_modified_after_saving(tmp_path):
    save_table(make_table(), tmp_path / "tab")
    tensors = good_parts()[0]
    tensors["weights"] = tensors["weights"].flip(-1).contiguous()  # still a valid table, but not the one hashed
    save_file(tensors, str(tmp_path / "tab.safetensors"))
    with pytest.raises(TableError, match="does not match the checksum in tab.json"):
        load_table(tmp_path / "tab")


def test_tensor_file_bit_flip(tmp_path):
    save_table(make_table(), tmp_path / "tab")
    st = tmp_path / "tab.safetensors"
    data = bytearray(st.read_bytes())
    data[-3] ^= 0x01
    st.write_bytes(bytes(data))
    with pytest.raises(TableError, match="does not match the checksum"):
        load_table(tmp_path / "tab")


def test_checksum_missing_from_json(tmp_path):
    tensors, meta = good_parts()
    jp = write_raw(tmp_path / "tab", tensors, meta)
    h = json.loads(jp.read_text())
    del h["tensors_sha256"]
    jp.write_text(json.dumps(h))
    with pytest.raises(TableError, match="does not match the checksum"):
        load_table(tmp_path / "tab")


def test_each_case_has_its_own_message():
    """The distinctive substrings used above really are distinct messages in table.py (the JSON-parse message is
    epd.io.read_json_header's, shared by tables, weights and teacher manifests)."""
    src = Path(table_mod.__file__).read_text()
    for needle in [
        "not a readable safetensors file", "contains NaN\"", "contains inf\"", "wrong shape",
        "some weight is negative", "do not sum to 1", "strictly increasing", "strictly inside (0, 1)",
        "(scale_bound)", "metadata mismatch: nfe=", "metadata mismatch: table has", "table file missing",
        "looks like a pickle", "does not match the checksum", "lacks tensors",
    ]:
        assert src.count(needle) == 1, needle


# ----------------------------------------------------------------------------------------------------------------- pickles
PICKLE_MSG = r"looks like a pickle \(torch\.save / pickle\.dump\) file\. epd never unpickles: loading a pickle runs arbitrary code"


def test_torch_save_file_refused(tmp_path, no_unpickling):
    torch.save(good_parts()[0], tmp_path / "t.pt")
    with pytest.raises(TableError, match=PICKLE_MSG):
        load_table(tmp_path / "t.pt")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_dump_file_refused(tmp_path, no_unpickling, protocol):
    with open(tmp_path / "t.pkl", "wb") as f:
        pickle.dump(good_parts()[0], f, protocol=protocol)
    with pytest.raises(TableError, match=PICKLE_MSG):
        load_table(tmp_path / "t.pkl")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("form", ["t", "t.json", "t.safetensors"])
def test_pickle_renamed_to_safetensors_next_to_valid_json(tmp_path, no_unpickling, writer, form):
    tensors, meta = good_parts()
    write_raw(tmp_path / "t", tensors, meta)
    load_table(tmp_path / "t")  # the pair is valid before the swap
    src = tmp_path / "payload.bin"
    if writer == "pickle":
        with open(src, "wb") as f:
            pickle.dump(tensors, f)
    else:
        torch.save(tensors, src)
    os.replace(src, tmp_path / "t.safetensors")
    rehash(tmp_path / "t")  # even with a matching checksum, the pickle check refuses it
    with pytest.raises(TableError, match=PICKLE_MSG):
        load_table(tmp_path / form)


def test_pickle_as_json_refused(tmp_path, no_unpickling):
    tensors, meta = good_parts()
    write_raw(tmp_path / "t", tensors, meta)
    with open(tmp_path / "t.json", "wb") as f:
        pickle.dump({"meta": meta}, f)
    with pytest.raises(TableError, match=PICKLE_MSG):
        load_table(tmp_path / "t")


def test_other_suffix_refused(tmp_path):
    (tmp_path / "t.npz").write_bytes(b"not a table")
    with pytest.raises(TableError, match=r"a table is NAME\.json \+ NAME\.safetensors, got a \.npz file"):
        load_table(tmp_path / "t.npz")


def test_package_never_unpickles():
    """No code path in epd/ reads a pickle: no pickle.load(s)/Unpickler, torch.load, or pickle-based loaders.

    Two audited exceptions for third-party checkpoints: ``torch.load(..., weights_only=True)`` (torch's restricted
    reader, which runs no code), and ``pickled.py``, the inert reader for MPS's whole-model pickle (it
    resolves only torch's tensor rebuilders; tests/test_t2i_metrics.py checks that a payload does not run)."""
    root = Path(epd.__file__).parent
    pattern = re.compile(
        r"\bpickle\s*\.\s*(load|loads|Unpickler)\b|\btorch\s*\.\s*load\s*\((?![^)]*weights_only\s*=\s*True)"
        r"|\bUnpickler\b"
        r"|^\s*(import|from)\s+(c?pickle|_pickle|dill|joblib|cloudpickle)\b"
        r"|\bnp\s*\.\s*load\s*\([^)]*allow_pickle\s*=\s*True",
        re.MULTILINE,
    )
    files = [f for f in sorted(root.rglob("*.py")) if f.relative_to(root).as_posix() != "pickled.py"]
    assert len(files) >= 5
    offenders = [f"{f.relative_to(root)}: {m.group(0)}" for f in files for m in pattern.finditer(f.read_text())]
    assert offenders == []


# ------------------------------------------------------------------------------------------------------- hand-set table
@pytest.mark.parametrize("num_steps", [2, 5, 11])
@pytest.mark.parametrize("num_points", [1, 2, 3, 4])
@pytest.mark.parametrize("afs", [True, False])
def test_handset_table(num_steps, num_points, afs):
    t = handset_table(num_steps, num_points, afs=afs)
    t.validate()
    nodes, gl_w = np.polynomial.legendre.leggauss(num_points)
    steps = num_steps - 1
    assert t.positions.shape == t.weights.shape == t.scale_dir.shape == t.scale_time.shape == (steps, num_points)
    expected_r = torch.tensor((nodes + 1) / 2, dtype=torch.float32).expand(steps, -1)
    assert torch.allclose(t.positions, expected_r, atol=1e-7, rtol=0)
    assert bool(((t.positions > 0) & (t.positions < 1)).all())
    assert bool((t.positions[:, 1:] > t.positions[:, :-1]).all())
    assert torch.allclose(t.weights, torch.tensor(gl_w / 2, dtype=torch.float32).expand(steps, -1))
    assert torch.allclose(t.weights.sum(-1), torch.ones(steps), atol=1e-6)
    assert bool((t.weights > 0).all())
    assert torch.equal(t.scale_dir, torch.ones(steps, num_points))
    assert torch.equal(t.scale_time, torch.ones(steps, num_points))
    assert t.meta.num_steps == num_steps and t.meta.num_points == num_points and t.meta.afs is afs
    assert t.meta.nfe == 2 * (num_steps - 1) - int(afs)
    sig = t.meta.sigmas()
    assert sig.shape == (num_steps,)
    assert bool((sig[1:] < sig[:-1]).all())
    assert sig[0].item() == pytest.approx(t.meta.sigma_max) and sig[-1].item() == pytest.approx(t.meta.sigma_min)


def test_handset_k1_is_the_midpoint_and_two_points_are_symmetric():
    t = handset_table(6, 1)
    assert torch.allclose(t.positions, torch.full((5, 1), 0.5)) and torch.equal(t.weights, torch.ones(5, 1))
    t2 = handset_table(6, 2)
    assert t2.positions[0, 0].item() == pytest.approx(0.5 - 0.5 / 3**0.5, abs=1e-7)
    assert t2.positions[0, 1].item() == pytest.approx(0.5 + 0.5 / 3**0.5, abs=1e-7)
    assert torch.allclose(t2.weights, torch.full((5, 2), 0.5))


def test_handset_plugin_and_meta_pass_through(tmp_path):
    t = handset_table(4, 2, plugin=True, schedule="logsnr", backbone="x", afs=False)
    assert t.meta.plugin and t.meta.schedule == "logsnr" and t.meta.nfe == 6
    assert len(t.meta.sigmas()) == 4
    save_table(t, tmp_path / "h")
    u = load_table(tmp_path / "h.json", expect={"plugin": True, "nfe": 6})
    assert u.meta == t.meta and torch.equal(u.positions, t.positions)


def test_handset_refuses_too_short_a_grid():
    with pytest.raises(TableError, match="need num_steps >= 2"):
        handset_table(1, 2)


# ---------------------------------------------------------------------------------------------- where a table is used
def test_check_table_use_names_each_mismatch():
    from epd.solvers.plan import check_table_use

    named = handset_table(4, 2, schedule="logsnr", backbone="gmm-digits")
    check_table_use(named, backbone="gmm-digits", sigma_max=80.0, schedule="logsnr")
    check_table_use(named)                                     # nothing asked, nothing to refuse
    with pytest.raises(TableError, match=r"t\.json was made for backbone 'gmm-digits', not 'sd3'"):
        check_table_use(named, backbone="sd3", source="t.json")
    with pytest.raises(TableError, match=r"made on schedule 'logsnr', which fixes its grid; asked for schedule 'polynomial'"):
        check_table_use(named, schedule="polynomial")
    with pytest.raises(TableError, match=r"grid starts at sigma=80, but the backbone's samples start at sigma_max=14.6"):
        check_table_use(named, sigma_max=14.6)
    own = handset_table(3, 2, schedule="explicit", grid=[80.0, 1.0, 0.002], sigma_max=80.0, sigma_min=0.002)
    check_table_use(own, backbone="unet-digits", sigma_max=80.0, schedule="explicit")   # no backbone: fits any
    with pytest.raises(TableError, match=r"carries its own grid \(schedule 'explicit'\) and ignores the schedule "
                                         r"options; asked for schedule 'time_uniform'"):
        check_table_use(own, schedule="time_uniform")


def test_sampling_at_another_guidance_than_the_table_was_fitted_at_warns():
    import dataclasses
    import warnings

    from epd.backbones import load_backbone
    from epd.solvers.plan import configure_for
    g = load_backbone("gmm-digits", guidance=2.0)
    table = handset_table(5, sigma_max=g.sigma_max, backbone="gmm-digits", schedule="time_uniform")
    with pytest.warns(UserWarning, match="fitted at guidance 1; sampling at the backbone's guidance 2"):
        configure_for(g, "epd", table=table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configure_for(g, "epd", table=dataclasses.replace(table, meta=dataclasses.replace(table.meta, guidance=2.0)))
