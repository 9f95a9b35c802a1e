"""PathTable: the pre-training image list held in numpy arrays reads back every path as given."""
from __future__ import annotations

import pytest

from passreid.data.path_table import PathTable


def test_every_path_reads_back_as_given():
    paths = ["lmdb:///data/LUPerson/lmdb#00001%2F0001.jpg", "lmdb:///data/LUPerson/lmdb#00001%2F0002.jpg",
             "lmdb:///data/LUPerson/lmdb#00002%2Fcaf\u00e9_\u4eba.jpg", "lmdb:///data/LUPerson/lmdb#9.jpg"]
    table = PathTable(iter(paths))
    assert table.prefix == "lmdb:///data/LUPerson/lmdb#"  # stored once
    assert len(table) == 4 and list(table) == paths
    assert table[-1] == paths[-1] and table[2] == paths[2]
    # The arrays hold the suffixes only: far less than one Python string per path.
    assert table.nbytes < sum(len(p.encode()) for p in paths)
    with pytest.raises(IndexError, match="index 4 out of range for 4 paths"):
        table[4]
    with pytest.raises(IndexError):
        table[-5]


def test_one_path_no_paths_and_a_path_that_prefixes_another():
    assert list(PathTable(["/a/b.jpg"])) == ["/a/b.jpg"]
    assert len(PathTable([])) == 0 and list(PathTable([])) == []
    # The common prefix may be a whole path (its suffix is empty) or end inside a name.
    assert list(PathTable(["/x/1.jpg", "/x/1.jpg.bak", "/x/10.jpg"])) == ["/x/1.jpg", "/x/1.jpg.bak", "/x/10.jpg"]
