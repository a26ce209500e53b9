"""Human-readable names of ImageNet classes, by wnid.

Prep records the names it finds beside the images (the devkit's meta.mat, Kaggle's LOC_synset_mapping.txt,
Hugging Face's classes.py) in dataset.json; where it found none, names come from the table shipped with the
package, `ilsvrc2012_synsets.txt`: the 1,000 ILSVRC-2012 classes with the synset words of the ILSVRC-2012
devkit (meta.mat's `words`), as Caffe distributes them (data/ilsvrc12/synset_words.txt). Imports nothing
from the package.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

TABLE = "ilsvrc2012_synsets.txt"
_HF_ENTRY = re.compile(r'"(n\d{8})"\s*:\s*"((?:[^"\\]|\\.)*)"')


def parse_mapping(text: str) -> dict[str, str]:
    """{wnid: name} from 'wnid name words' lines (Kaggle's LOC_synset_mapping.txt, Caffe's synset_words)."""
    out = {}
    for line in text.splitlines():
        wnid, _, name = line.strip().partition(" ")
        if re.fullmatch(r"n\d{8}", wnid) and name:
            out[wnid] = name.strip()
    return out


def parse_hf_classes(text: str) -> dict[str, str]:
    """{wnid: name} from Hugging Face imagenet-1k's classes.py (an OrderedDict literal), read as text."""
    return {w: bytes(n, "utf-8").decode("unicode_escape") for w, n in _HF_ENTRY.findall(text)}


@functools.cache
def ilsvrc2012() -> dict[str, str]:
    """{wnid: name} of the shipped table (1,000 classes)."""
    return parse_mapping(resources.files(__package__).joinpath(TABLE).read_text(encoding="utf-8"))
