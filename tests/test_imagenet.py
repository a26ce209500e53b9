import re

import pytest
from conftest import CLASSES, sample_maker

from alexnet_pipeline.prep import imagenet, units


def _labels(source, split):
    """{file name: label} of every item the units yield."""
    return {re.split("[/:]", item.source)[-1]: item.label for u in source.units[split] for item in u.items()}


@pytest.mark.parametrize("layout", ["extracted", "kaggle", "devkit", "archives"])
def test_every_layout_gives_the_true_labels(sample, layout):
    root, truth = sample
    source = imagenet.find(root / layout)
    assert source.classes == sorted(sample_maker.WNIDS[:CLASSES])
    assert _labels(source, "val") == truth["val"]
    assert _labels(source, "train") == truth["train"]


def test_the_devkit_trap_is_real_in_the_sample_and_avoided(sample):
    root, truth = sample
    gt = (root / "devkit/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read_text().split()
    names = sorted(truth["val"])
    # the raw IDs (minus one) are not the sorted-index labels, so using them directly would be wrong
    assert sum(int(i) - 1 != truth["val"][n] for i, n in zip(gt, names, strict=True)) > len(names) // 2
    assert _labels(imagenet.find(root / "devkit"), "val") == truth["val"]


def test_devkit_archive_is_read_without_extraction(sample, tmp_path):
    root, truth = sample
    (tmp_path / "val").mkdir()
    for p in (root / "devkit/val").iterdir():
        (tmp_path / "val" / p.name).symlink_to(p)
    (tmp_path / "train").symlink_to(root / "extracted/train")
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").symlink_to(root / "archives/ILSVRC2012_devkit_t12.tar.gz")
    assert _labels(imagenet.find(tmp_path), "val") == truth["val"]


def test_limit_per_class_takes_the_same_first_names_from_folders_and_archives(sample):
    root, _ = sample
    a = _labels(imagenet.find(root / "extracted", limit_per_class=2), "train")
    b = _labels(imagenet.find(root / "archives", limit_per_class=2), "train")
    assert a == b and len(a) == 2 * CLASSES
    assert len(_labels(imagenet.find(root / "kaggle", limit_per_class=1), "val")) == CLASSES


def test_forced_layout_and_missing_pieces(sample, tmp_path):
    root, _ = sample
    assert "archive" in imagenet.find(root / "archives", layout="archives").layout["train"]
    with pytest.raises(imagenet.LayoutError, match="no training images"):
        imagenet.find(root / "archives", layout="folders")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    (tmp_path / "train").symlink_to(root / "extracted/train")
    with pytest.raises(imagenet.LayoutError, match="no labels"):
        imagenet.find(tmp_path)


@pytest.mark.parametrize("make", ["empty", "cats", "file"])
def test_trees_that_are_not_imagenet_are_refused_clearly(tmp_path, make):
    if make == "cats":
        (tmp_path / "train" / "cats").mkdir(parents=True)
        (tmp_path / "train" / "n01440764").mkdir()
    root = tmp_path / "f.txt" if make == "file" else tmp_path
    if make == "file":
        root.write_text("x")
    with pytest.raises(imagenet.LayoutError, match=str(root.name) if make != "cats" else "cats"):
        imagenet.find(root)


def test_hugging_face_names_give_the_original_keys_and_labels(sample):
    root, truth = sample
    source = imagenet.find(root / "hf")
    assert source.classes == sorted(sample_maker.WNIDS[:CLASSES])
    labels = {}
    for unit in units.with_payloads([u for split in source.units.values() for u in split]):
        for item in unit.items():
            labels[item.key] = item.label
    want = {n.split(".")[0]: label for split in ("train", "val") for n, label in truth[split].items()
            if n != sample_maker.STRAY}
    assert {k: v for k, v in labels.items() if k in want} == want
    assert not any(k.startswith("ILSVRC2012_test") for k in labels)  # test images carry no class: not read
    assert units.hf_key("ILSVRC2012_val_00000001_n01751748.JPEG") == ("ILSVRC2012_val_00000001", "n01751748")


def test_a_hugging_face_archive_complete_but_short_of_its_listed_members_is_named(sample, tmp_path):
    """An archive replaced by a whole, readable one with fewer members than were listed (the cache and the
    stream disagree): the stream reaches its end with units unfilled, and the archive is named."""
    import io
    import shutil
    import tarfile

    root = tmp_path / "hf"
    shutil.copytree(sample[0] / "hf", root)
    val_units = imagenet.find(root, splits=("val",)).units["val"]  # listed with every member
    archive = root / "data" / "val_images.tar.gz"
    with tarfile.open(archive, "r:gz") as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(archive, "w:gz") as tf:  # the same archive, whole, without its last member
        for m, data in members[:-1]:
            tf.addfile(m, io.BytesIO(data))
    with pytest.raises(units.ArchiveError, match=f"{archive}: unreadable or truncated \\(fewer members"):
        for _ in units.with_payloads(val_units):
            pass


def test_the_devkit_is_read_once_per_find(sample, monkeypatch):
    """Class names, the class list and the val labels all come from the devkit: one decompression serves them."""
    reads, real = [], imagenet._read_devkit
    monkeypatch.setattr(imagenet, "_read_devkit", lambda source, data: reads.append(1) or real(source, data))
    source = imagenet.find(sample[0] / "archives")
    assert source.units["val"] and source.class_names and len(reads) == 1


def test_a_tar_cut_between_two_members_is_named_truncated_though_tarfile_reads_it_without_a_word(tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("a.JPEG", "b.JPEG"):
            info = tarfile.TarInfo(name)
            info.size = 700
            tf.addfile(info, io.BytesIO(b"j" * 700))
    whole = buf.getvalue()
    (tmp_path / "whole.tar").write_bytes(whole)
    assert sorted(imagenet._tar_index(tmp_path / "whole.tar")) == ["a.JPEG", "b.JPEG"]
    for cut in (512 + 1024, 2 * (512 + 1024)):  # after the first member; after the second, before the marker
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        with pytest.raises(imagenet.LayoutError, match="cut.tar: truncated \\(no end-of-archive marker"):
            imagenet._tar_index(tmp_path / "cut.tar")
