"""epd.pickled, the one audited unpickler: it rebuilds tensors and plain values from other projects' pickles and runs
nothing from them. Each test hides code in the pickle that would leave a marker file if it ran (a ``__reduce__``
calling ``os.system``, a ``builtins.exec`` call, the persistence source the original loader would ``exec``) and
asserts that the marker does not appear."""
from __future__ import annotations

import builtins
import os
import pickle
import pickletools
import zipfile

import pytest
import torch

from epd.pickled import Inert, PersistentObject, module_tensors, pickled_module_state_dict, read_pickle
from upstream_pickles import Persistent, dump, module_state


class SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def markers(tmp_path):
    return [tmp_path / "by-system", tmp_path / "by-exec", tmp_path / "by-source"]


# --- torch.save(module) zip archives (MPS) -------------------------------------------------------------------------

def test_zip_module_state_dict_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    module[0].payload = SystemCall(marker)
    torch.save(module, tmp_path / "evil.pth")
    state = pickled_module_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    want = module.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_zip_reader_refuses_plain_pickles(tmp_path):
    dump({"a": torch.zeros(2)}, tmp_path / "plain.pkl")
    with pytest.raises(ValueError, match=r"plain\.pkl is not a torch zip archive"):
        pickled_module_state_dict(tmp_path / "plain.pkl")


# --- plain pickles of torch_utils.persistence objects ------------------------------------------------------------

def persistent_file(tmp_path):
    by_system, by_exec, by_source = markers(tmp_path)
    source = f"open({str(by_source)!r}, 'w').write('ran')\nclass Net:\n    pass\n"
    child = Persistent("Child", {"depth": 2, "hook": ExecCall(by_exec)}, source)
    params = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([0.5, -1.5])}
    state = module_state(params, name="net", sizes=[1, 2, 3], nested={"k": (1.5, None, "x")}, child=child,
                         payload=SystemCall(by_system))
    state["_buffers"] = {"running": torch.ones(3, dtype=torch.float64), "scratch": torch.zeros(1)}
    state["_non_persistent_buffers_set"] = {"scratch"}
    return dump({"model": Persistent("Net", state, source), "step": 10, "t": torch.linspace(1, 0, 4)},
                tmp_path / "snapshot.pkl"), params


def test_persistence_pickle_has_upstreams_layout(tmp_path):
    """The test's pickle names what upstream's do: the persistence loader and torch's legacy storage blobs."""
    path, _ = persistent_file(tmp_path)
    data = path.read_bytes()
    strings = [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
    assert data[:2] == b"\x80\x04" and not zipfile.is_zipfile(path)
    for module, name in (("torch_utils.persistence", "_reconstruct_persistent_obj"),
                         ("torch.storage", "_load_from_bytes"), ("torch._utils", "_rebuild_parameter")):
        assert any(a == module and b == name for a, b in zip(strings, strings[1:]))


def test_persistence_pickle_read_and_nothing_runs(tmp_path):
    path, params = persistent_file(tmp_path)
    out = read_pickle(path)
    assert [m for m in markers(tmp_path) if m.exists()] == []
    assert out["step"] == 10 and torch.equal(out["t"], torch.linspace(1, 0, 4))
    net = out["model"]
    assert isinstance(net, PersistentObject) and net.class_name == "Net" and net.version == 6 and net.kind == "class"
    assert "write('ran')" in net.module_src                       # kept as text, never executed
    assert net.state["name"] == "net" and net.state["sizes"] == [1, 2, 3] and net.state["nested"] == {"k": (1.5, None, "x")}
    assert isinstance(net.state["payload"], Inert) and net.state["payload"]._name.endswith(".system")
    assert isinstance(net.state["child"], PersistentObject) and net.state["child"].state["depth"] == 2
    assert isinstance(net.state["child"].state["hook"], Inert)
    assert isinstance(net.state["_modules"]["sigmoid"], Inert)
    tensors = module_tensors(net)
    assert sorted(tensors) == ["b", "running", "w"]                # the non-persistent buffer is left out
    assert all(torch.equal(tensors[k], v) for k, v in params.items())
    assert tensors["running"].dtype == torch.float64


def test_a_normal_unpickler_would_have_run_it(tmp_path):
    """The markers can appear: an ordinary ``pickle.load`` of the same kind of file runs the payload."""
    marker = tmp_path / "by-system"
    dump({"payload": SystemCall(marker)}, tmp_path / "p.pkl")
    with open(tmp_path / "p.pkl", "rb") as f:
        pickle.load(f)   # the point of this test
    assert marker.exists()
    marker.unlink()
    read_pickle(tmp_path / "p.pkl")
    assert not marker.exists()


class EvilStorage:
    """A storage blob (what ``torch.storage._load_from_bytes`` receives) that is itself a payload."""

    def __init__(self, marker):
        self.blob = pickle.dumps(SystemCall(marker), protocol=2)

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


def test_storage_blobs_go_through_torchs_restricted_reader(tmp_path):
    marker = tmp_path / "by-storage"
    dump({"model": Persistent("Net", {"t": EvilStorage(marker)})}, tmp_path / "s.pkl")
    with pytest.raises(ValueError, match=r"s\.pkl is not a readable pickle"):
        read_pickle(tmp_path / "s.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("content, match", [
    (b"", r"is not a pickle"),
    (b"not a pickle at all", r"is not a pickle"),
    (b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00}\x94(", r"is not a readable pickle"),
])
def test_plain_reader_refuses_what_is_not_a_pickle(tmp_path, content, match):
    (tmp_path / "bad.pkl").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_pickle(tmp_path / "bad.pkl")


def test_plain_reader_refuses_truncated_and_zip_files(tmp_path):
    path, _ = persistent_file(tmp_path)
    (tmp_path / "cut.pkl").write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"cut\.pkl is not a readable pickle"):
        read_pickle(tmp_path / "cut.pkl")
    torch.save({"a": torch.zeros(1)}, tmp_path / "z.pt")
    with pytest.raises(ValueError, match=r"z\.pt is a torch zip archive"):
        read_pickle(tmp_path / "z.pt")
