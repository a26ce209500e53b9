"""Work files (prep/workfiles.py): a unit's JPEGs, header and statistics written as one file and read back; a
file cut short or changed in one byte is not intact."""

import numpy as np

from alexnet_pipeline.prep import workfiles
from alexnet_pipeline.prep.stats import Moments


def _written(tmp_path, moments=None):
    jpegs = [b"\xff\xd8first", b"\xff\xd8second one", b"\xff\xd8" + bytes(range(256))]
    path = tmp_path / f"u{workfiles.SUFFIX}"
    workfiles.write(path, jpegs, {"keys": ["a", "b", "c"], "labels": [3, 1, 2], "skipped": []}, moments)
    return path, jpegs


def test_a_work_file_gives_back_its_jpegs_header_and_statistics(tmp_path):
    moments = Moments(4)
    for planes in np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4):
        moments.add_planes(planes)
    path, jpegs = _written(tmp_path, moments)
    header, back = workfiles.read_header(path)
    assert header["keys"] == ["a", "b", "c"] and header["labels"] == [3, 1, 2]
    spans = list(zip(header["offsets"], header["sizes"], strict=True))
    assert workfiles.read_jpegs(str(path), spans) == jpegs
    assert workfiles.read_jpegs(str(path), spans[1:]) == jpegs[1:]
    want, got = moments.to_arrays(), back.to_arrays()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    assert workfiles.intact(path)


def test_a_work_file_without_statistics_has_none(tmp_path):
    path, _ = _written(tmp_path)
    assert workfiles.read_header(path)[1] is None and workfiles.intact(path)


def test_a_work_file_cut_short_or_with_one_byte_changed_is_not_intact(tmp_path):
    path, _ = _written(tmp_path)
    data = path.read_bytes()
    for broken in (data[:-1], data[:5], b"", data[:3] + bytes([data[3] ^ 1]) + data[4:]):
        path.write_bytes(broken)
        assert not workfiles.intact(path), len(broken)


def test_a_work_file_larger_than_a_read_piece_is_checked_whole_and_its_magic_with_it(tmp_path):
    """A class archive's unit holds tens of MB, read for the CRC in 4 MiB pieces: the CRC runs on across them.
    The magic lies outside the CRC and is checked on its own."""
    path = tmp_path / f"big{workfiles.SUFFIX}"
    jpegs = [bytes([k]) * (3 << 20) for k in range(3)]  # 9 MiB: three pieces
    workfiles.write(path, jpegs, {"keys": ["a", "b", "c"], "labels": [0, 1, 2], "skipped": []}, None)
    assert workfiles.intact(path)
    data = path.read_bytes()
    for at in (5 << 20, len(data) - 1):  # a byte in the second piece; the magic's last byte
        path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
        assert not workfiles.intact(path), at
