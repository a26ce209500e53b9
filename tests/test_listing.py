"""The source listing: one stat per file, one pass, the same bytes whatever the order of work; archives listed
once and then from the cache while they keep their size and time."""

import os
import shutil
from collections import Counter
from pathlib import Path

from conftest import CLASSES

from alexnet_pipeline.prep import PrepConfig, imagenet, listing, run


def test_a_folder_lists_its_regular_files_and_dead_links_in_name_order(tmp_path):
    d = tmp_path / "train" / "n01440764"
    d.mkdir(parents=True)
    for name, size in (("b.JPEG", 3), ("a.JPEG", 5), (".hidden", 1)):
        (d / name).write_bytes(b"x" * size)
    (d / "sub").mkdir()
    (d / "dead.JPEG").symlink_to(d / "nowhere")
    (d / "loop.JPEG").symlink_to(d / "loop.JPEG")
    (d / "link.JPEG").symlink_to(d / "a.JPEG")
    folder = listing.scan(str(tmp_path), "train/n01440764")
    want = []
    for name in sorted(os.listdir(d)):
        p = d / name
        if p.is_dir():
            continue
        st = os.stat(p) if p.exists() else None
        want.append((name, st.st_size, st.st_mtime_ns) if st else (name, -1, -1))
    assert folder.entries() == want and folder.count == 6
    assert folder.names() == [name for name, *_ in want]  # every name, not only those of the first rows
    back = listing.Listing.from_bytes(listing.Listing([folder]).to_bytes())
    assert back.files() == {f"train/n01440764/{n}": (s, m) for n, s, m in want}


def test_two_archives_of_one_folder_list_as_one_folder_holding_both(tmp_path):
    """Two parts of one folder (two archives of the root, read separately): the listing keeps every file."""
    for part, names in (("a", ("x.JPEG", "y.JPEG")), ("b", ("z.JPEG",))):
        (tmp_path / part / "train").mkdir(parents=True)
        for name in names:
            (tmp_path / part / "train" / name).write_bytes(b"1")
    both = listing.Listing([listing.scan(str(tmp_path / "a"), "train"), listing.scan(str(tmp_path / "b"), "train")])
    assert sorted(both.files()) == ["train/x.JPEG", "train/y.JPEG", "train/z.JPEG"] and len(both) == 3


def test_changes_name_what_was_added_removed_and_changed(tmp_path):
    (tmp_path / "c").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "c" / name).write_bytes(b"1")
    old = listing.Listing([listing.scan(str(tmp_path), "c")])
    (tmp_path / "c" / "a").unlink()
    (tmp_path / "c" / "d").write_bytes(b"1")
    (tmp_path / "c" / "b").write_bytes(b"22")
    new = listing.Listing([listing.scan(str(tmp_path), "c")])
    assert listing.changes(old, new) == "1 added, 1 removed, 1 changed (+c/d, -c/a, ~c/b)"
    assert listing.changes(new, new) == "" and old.digest() != new.digest()


def test_a_rerun_over_a_finished_output_stats_each_source_file_once(prepped, sample, monkeypatch):
    """The "nothing to do" re-run reads each folder once (os.scandir: the entry's one stat); no other stat of
    an image (the old listing made two per file, serially, through pathlib)."""
    root = str(sample[0] / "extracted")
    stats, scans = Counter(), []
    for owner, name in ((os, "stat"), (os, "lstat"), (Path, "stat"), (Path, "lstat"), (Path, "is_file"),
                        (Path, "exists"), (Path, "is_symlink")):
        real = getattr(owner, name)

        def counting(path, *args, real=real, name=name, **kwargs):
            if str(path).startswith(root) and str(path).endswith(".JPEG"):
                stats[name] += 1
            return real(path, *args, **kwargs)
        monkeypatch.setattr(owner, name, counting)
    real_scan = listing.scan
    monkeypatch.setattr(imagenet, "scan", lambda r, rel: scans.append(rel) or real_scan(r, rel))
    report = run(PrepConfig(sample[0] / "extracted", prepped, shard_size=5, workers=1, progress=False))
    assert report.resumed and not report.processed
    assert sum(stats.values()) == 0, stats
    n_images = sum(len(files) for _, _, files in os.walk(root))
    assert len(scans) == len(set(scans)) == 2 * CLASSES  # each class folder of train and val, once
    assert report.stages[0].count == n_images


def test_archives_are_listed_once_then_from_the_cache_while_they_keep_size_and_time(sample, tmp_path, monkeypatch):
    hf = tmp_path / "hf"
    shutil.copytree(sample[0] / "hf", hf)
    listed, real = [], imagenet._gz_members
    monkeypatch.setattr(imagenet, "_gz_members", lambda path: listed.append(Path(path).name) or real(path))
    cfg = PrepConfig(hf, tmp_path / "o", shard_size=5, workers=1, progress=False)
    run(cfg)
    assert sorted(listed) == sorted(p.name for p in (hf / "data").glob("*_images*.tar.gz")
                                    if not p.name.startswith("test"))
    listed.clear()
    assert run(cfg).resumed and listed == []  # "nothing to do" without decompressing anything
    archive = hf / "data" / "val_images.tar.gz"
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    found = imagenet.find(hf, cache=listing.ArchiveCache(tmp_path / "o"))
    assert listed == ["val_images.tar.gz"] and found.units["val"]


def test_a_listings_bytes_are_the_same_whatever_order_its_folders_were_listed_in(tmp_path):
    """Folders are listed by workers in whatever order they finish: the listing (and the digest a resume
    compares) must not depend on it."""
    rels = ["train/n02", "train/n01", "val"]
    for k, rel in enumerate(rels):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / f"{k}.JPEG").write_bytes(b"x" * (k + 1))
    folders = [listing.scan(str(tmp_path), rel) for rel in rels]
    one, other = listing.Listing(folders), listing.Listing(folders[::-1])
    assert one.to_bytes() == other.to_bytes() and one.digest() == other.digest()
