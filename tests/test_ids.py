"""Request ids: unique, in creation order, and valid MongoDB ObjectIds of the moment they were
made (a request's id is its record's `_id` in the MongoDB mirror)."""

from __future__ import annotations

import subprocess
import sys
import time

from bson import ObjectId

from app.domain.ids import new_object_id


def test_ids_are_unique_ordered_objectids_of_their_creation_time():
    before = int(time.time())
    ids = [new_object_id() for _ in range(100_000)]
    after = int(time.time())
    assert len(set(ids)) == len(ids)
    made_at = {int(ObjectId(object_id).generation_time.timestamp()) for object_id in ids[::1000]}
    assert all(before <= second <= after for second in made_at)
    # One process's ids share their middle part and count up (modulo the 3-byte counter).
    assert len({object_id[8:18] for object_id in ids}) == 1


def test_two_processes_never_make_the_same_id():
    code = "from app.domain.ids import new_object_id; print(' '.join(new_object_id() for _ in range(1000)))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True) for _ in range(2)]
    first, second = (set(run.stdout.split()) for run in runs)
    assert len(first) == len(second) == 1000 and not first & second
