"""Units of work (prep/units.py): sample keys from file names, and the Hugging Face archives' readers, which
fill each unit with its members' bytes, one thread per archive, and name an archive cut short."""

import io
import tarfile

import pytest

from alexnet_pipeline.prep import units


def test_a_sample_key_is_the_name_up_to_its_first_dot_with_odd_bytes_percent_encoded():
    assert units.sample_key("n01440764/n01440764_10026.JPEG") == "n01440764_10026"
    assert units.sample_key("a b.c.JPEG") == "a%20b"
    assert units.sample_key("caf\udce9.jpg") == "caf%E9"  # a name that is not UTF-8 keeps its bytes


def test_a_hugging_face_name_gives_the_folder_layouts_key_and_its_class():
    assert units.hf_key("train/n01440764_10026_n01440764.JPEG") == ("n01440764_10026", "n01440764")
    assert units.hf_key("test/ILSVRC2012_test_00000001.JPEG") == ("ILSVRC2012_test_00000001", None)


def _archive(path, names):
    with tarfile.open(path, "w:gz") as tf:
        for name in names:
            data = name.encode() * 3
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def _units(archive, names, per_unit):
    members = [units.GzMember(i, n, i % 2) for i, n in enumerate(names)]
    return [units.HfUnit("train", f"train/{archive}-{k}", archive=archive, members=tuple(members[k:k + per_unit]))
            for k in range(0, len(members), per_unit)]


def test_every_hugging_face_unit_comes_filled_with_its_members_bytes_and_the_others_first(tmp_path):
    names = [f"img_{i}_n0144076{i % 2}.JPEG" for i in range(7)]
    a, b = _archive(tmp_path / "a.tar.gz", names), _archive(tmp_path / "b.tar.gz", names[:4])
    folder = units.FolderUnit("train", "train/f", expected=0)
    got = list(units.with_payloads([*_units(a, names, 3), folder, *_units(b, names[:4], 2)], queue_size=1,
                                   max_bytes=40))
    assert got[0] is folder and len(got) == 1 + 3 + 2
    for unit in got[1:]:
        assert [bytes(p) if not isinstance(p, int) else p for p in unit.payload] == \
            [m.name.encode() * 3 if len(m.name) * 3 <= 40 else len(m.name) * 3 for m in unit.members]
    assert sorted(u.name for u in got[1:]) == sorted(u.name for u in [*_units(a, names, 3), *_units(b, names[:4], 2)])


def test_an_archive_shorter_than_when_it_was_listed_is_named(tmp_path):
    names = [f"img_{i}_n01440764.JPEG" for i in range(4)]
    a = _archive(tmp_path / "a.tar.gz", names[:2])
    with pytest.raises(units.ArchiveError, match=r"a.tar.gz: unreadable or truncated \(fewer members"):
        list(units.with_payloads(_units(a, names, 2)))


def test_closing_the_reader_early_stops_the_archive_threads(tmp_path):
    import threading

    names = [f"img_{i}_n01440764.JPEG" for i in range(40)]
    a = _archive(tmp_path / "a.tar.gz", names)
    before = threading.active_count()
    jobs = units.with_payloads(_units(a, names, 1), queue_size=1)
    next(jobs)
    jobs.close()
    assert threading.active_count() == before


def test_a_bug_in_an_archive_reader_is_raised_not_waited_for(tmp_path, monkeypatch):
    names = [f"img_{i}_n01440764.JPEG" for i in range(4)]
    a = _archive(tmp_path / "a.tar.gz", names)

    def broken(tf, member):
        raise RuntimeError("a bug")

    monkeypatch.setattr(units, "member_bytes", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        list(units.with_payloads(_units(a, names, 2)))


def test_directory_entries_do_not_shift_an_archives_member_numbers(tmp_path):
    names = [f"img_{i}_n01440764.JPEG" for i in range(4)]
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for k, name in enumerate(names):
            if k % 2 == 0:  # a folder entry before every second file, as tar -c of a tree writes them
                folder = tarfile.TarInfo(f"dir{k}")
                folder.type = tarfile.DIRTYPE
                tf.addfile(folder)
            data = name.encode() * 3
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = list(units.with_payloads(_units(str(path), names, 2)))
    assert [bytes(p) for u in got for p in u.payload] == [n.encode() * 3 for n in names]


def _tar_bytes(members: dict[str, bytes], end: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if not end:  # the members alone, without the end-of-archive blocks
        raw = raw[:sum(512 + -(-len(d) // 512) * 512 for d in members.values())]
    return raw


def test_a_class_tar_keeps_its_first_names_in_sorted_order_reads_a_member_of_the_limit_and_stays_in_its_bytes(
        tmp_path):
    members = {f"n01440764_{k}.JPEG": bytes([k]) * (100 + k) for k in (7, 2, 9, 1, 5)}
    inner = _tar_bytes(members, end=False)  # a class tar read up to its size, never into the bytes after it
    outer = tmp_path / "train.tar"
    outer.write_bytes(inner + _tar_bytes({"n01440764_0.JPEG": b"next tar"}))

    def items(**options):
        unit = units.ClassTarUnit("train", "train/n01440764", archive=str(outer), offset=0, size=len(inner),
                                  label=3, **options)
        return [(i.key, i.label, len(i.data), i.error) for i in unit.items(max_bytes=105)]

    assert items() == [("n01440764_7", 3, 0, units.oversize(107, 105)), ("n01440764_2", 3, 102, ""),
                       ("n01440764_9", 3, 0, units.oversize(109, 105)), ("n01440764_1", 3, 101, ""),
                       ("n01440764_5", 3, 105, "")]  # exactly max_bytes: read
    assert [key for key, *_ in items(limit=2)] == ["n01440764_1", "n01440764_2"]
    unit = units.ClassTarUnit("train", "train/n01440764", archive=str(outer), offset=0, size=len(inner), label=3)
    # a bad image is named where a user finds it: the class tar inside the archive, then the member
    assert next(unit.items()).source == f"{outer}:n01440764.tar/n01440764_7.JPEG"


def test_a_flat_tars_and_a_folders_member_of_exactly_the_limit_is_read_and_one_byte_more_is_not(tmp_path):
    members = {"ILSVRC2012_val_00000001.JPEG": b"a" * 105, "ILSVRC2012_val_00000002.JPEG": b"b" * 106}
    flat = tmp_path / "val.tar"
    flat.write_bytes(_tar_bytes(members))
    with tarfile.open(flat) as tf:
        listed = tuple(units.TarMember(m.offset_data, m.size, m.name, 0) for m in tf.getmembers())
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in members.items():
        (folder / name).write_bytes(data)
    for unit in (units.TarUnit("val", "val/0", archive=str(flat), members=listed),
                 units.FolderUnit("val", "val/f", files=tuple(units.FileEntry(str(folder / n), 0) for n in members))):
        assert [(len(i.data), i.error) for i in unit.items(max_bytes=105)] == [(105, ""),
                                                                               (0, units.oversize(106, 105))]


def test_an_archives_reader_stops_once_its_units_are_filled_and_never_reads_the_rest(tmp_path):
    """The units of a subset (--train-per-class) take an archive's first members: its reader stops there, so
    neither the time nor a fault of the bytes after them (here, the archive cut short) reaches the run."""
    import os

    names = [f"img_{i}_n01440764.JPEG" for i in range(40)]
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name in names:
            data = os.urandom(4000)  # incompressible: the cut below falls well after the first members
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(path.read_bytes()[:80_000])
    got = list(units.with_payloads(_units(str(path), names[:2], 1)))
    assert [len(u.payload[0]) for u in got] == [4000, 4000]
    with pytest.raises(units.ArchiveError, match="a.tar.gz: unreadable or truncated"):
        list(units.with_payloads(_units(str(path), names, 20)))  # all of it: the cut is named
