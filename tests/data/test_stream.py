"""The data stream: the former step sampler's contract for files, block-shuffled dataset rows, held-out rows,
mixing by weights, and exact restore from a saved position (mid-block, across files and epochs)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tinyvlm.data.records import Example
from tinyvlm.data.schemas import RatingFilter
from tinyvlm.data.readers import open_rows, parse_source
from tinyvlm.data.stream import (
    Counts, HoldOut, Mixture, RecordSource, RowSource, StepBatches, held_out, held_out_rows,
)
from tinyvlm.errors import DataError

from writers import cauldron_rows, finevision_rows, write_parquet

NO_FILTER = RatingFilter()


def examples(count: int) -> list[Example]:
    return [Example([i], [i], ()) for i in range(count)]


def ids(batch: list) -> list[int]:
    return [item.input_ids[0] for item in batch]


def batches(size: int, *, micro_batch: int, world_size: int = 1, rank: int = 0, accumulation: int = 1) -> StepBatches:
    mixture = Mixture([RecordSource("file", examples(size), seed=0, index=0)], None, seed=0)
    return StepBatches(mixture, micro_batch=micro_batch, world_size=world_size, rank=rank, accumulation=accumulation)


def test_processes_and_accumulation_see_the_samples_of_one_big_batch() -> None:
    single = [ids(b) for b in batches(10, micro_batch=4).iterate(0, 6)]  # 24 positions: crosses two epochs
    ranks = [[ids(b) for b in batches(10, micro_batch=2, world_size=2, rank=r).iterate(0, 6)] for r in range(2)]
    accumulated = [ids(b) for b in batches(10, micro_batch=2, accumulation=2).iterate(0, 6)]
    for step, whole in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == whole
        assert accumulated[2 * step] + accumulated[2 * step + 1] == whole
    seen = sum(single, [])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new permutation every epoch


def test_a_file_restores_from_its_position() -> None:
    straight = batches(10, micro_batch=3)
    expected = [ids(b) for b in straight.iterate(0, 8)]
    state = json.loads(json.dumps(straight.state_at(5)))  # what a checkpoint stores
    resumed = batches(10, micro_batch=3)
    resumed.mixture.restore(state)
    assert [ids(b) for b in resumed.iterate(5, 8)] == expected[5:]
    with pytest.raises(DataError, match="not at step 4"):
        next(resumed.iterate(4, 8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """the_cauldron rows in two parquet files of 23 and 17 rows (a block boundary falls inside a file)."""
    root = tmp_path_factory.mktemp("cauldron")
    write_parquet(root / "data" / "train-00000-of-00002.parquet", "the_cauldron", cauldron_rows(23))
    write_parquet(root / "data" / "train-00001-of-00002.parquet", "the_cauldron", cauldron_rows(17, start=23))
    return root / "data"


def row_source(folder: Path, *, block: int = 7, val_fraction: float = 0.1, seed: int = 0, ratings=NO_FILTER) -> RowSource:
    rows = open_rows(parse_source(str(folder)), "train")
    return RowSource(rows, seed=seed, index=0, block=block, val_fraction=val_fraction, ratings=ratings)


def number(record) -> int:
    """The picture number the_cauldron rows of `writers` ask about."""
    return int(record.messages[0]["content"].split("picture ")[1].rstrip("?"))


def test_rows_are_block_shuffled_every_row_once_per_epoch_held_out_rows_never(folder: Path) -> None:
    source = row_source(folder)
    assert source.rows.identity == "data:train"  # the folder's name, not where it is mounted
    val = {i for i in range(40) if held_out(0, source.rows.identity, i, 0.1)}
    assert 0 < len(val) < 10
    mixture = Mixture([source], None, seed=0)
    first = [number(mixture.next()) for _ in range(40 - len(val))]
    second = [number(mixture.next()) for _ in range(40 - len(val))]
    assert sorted(first) == sorted(second) == sorted(set(range(40)) - val)
    assert first != sorted(first) and first != second  # shuffled, differently in each epoch
    blocks = [sorted(set(range(b, min(b + 7, 40))) - val) for b in range(0, 40, 7)]
    at = 0
    for block in blocks:  # each block of 7 stored rows is permuted in place (minus its held-out rows)
        assert sorted(first[at : at + len(block)]) == block
        at += len(block)
    held = [number(r) for r in held_out_rows(source.rows, seed=0, val_fraction=0.1, ratings=NO_FILTER, limit=100)]
    assert held == sorted(val)
    assert row_source(folder, block=1, val_fraction=0.0).next(mixture.counts) is not None


@pytest.mark.parametrize("stop", [3, 7, 12, 20, 36, 39, 41, 55])  # mid-block, block ends, file boundary, epochs
def test_rows_restore_exactly_from_any_position(folder: Path, stop: int) -> None:
    straight = Mixture([row_source(folder)], None, seed=0)
    for _ in range(stop):
        straight.next()
    state = json.loads(json.dumps(straight.state()))
    expected = [straight.next().where for _ in range(30)]
    resumed = Mixture([row_source(folder)], None, seed=0)
    resumed.restore(state)
    assert [resumed.next().where for _ in range(30)] == expected


def test_seed_changes_order_and_held_out_rows(folder: Path) -> None:
    a = Mixture([row_source(folder, seed=0)], None, seed=0)
    b = Mixture([row_source(folder, seed=1)], None, seed=1)
    assert [a.next().where for _ in range(20)] != [b.next().where for _ in range(20)]
    assert {i for i in range(400) if held_out(0, "x", i, 0.1)} != {i for i in range(400) if held_out(1, "x", i, 0.1)}


def test_mixing_follows_the_weights_and_the_seed(folder: Path) -> None:
    def mixture(seed: int) -> Mixture:
        return Mixture([RecordSource("file", examples(10), seed=seed, index=0), row_source(folder, seed=seed)],
                       [3.0, 1.0], seed=seed)

    mixed, same, other = mixture(0), mixture(0), mixture(1)
    drawn = [mixed.choice(p) for p in range(8000)]
    share = Counter(drawn)[0] / len(drawn)
    assert abs(share - 0.75) < 0.02
    assert drawn == [same.choice(p) for p in range(8000)]
    assert drawn != [other.choice(p) for p in range(8000)]
    kinds = [type(mixed.next()).__name__ for _ in range(400)]
    assert kinds.count("Example") == sum(1 for p in range(400) if drawn[p] == 0)
    state = json.loads(json.dumps(mixed.state()))
    expected = [repr(mixed.next()) for _ in range(50)]
    again = mixture(0)
    again.restore(state)
    assert [repr(again.next()) for _ in range(50)] == expected


def test_rating_filters_drop_turns_and_count_emptied_rows(tmp_path: Path) -> None:
    write_parquet(tmp_path / "fv.parquet", "finevision", finevision_rows(6))
    kept_first = Mixture([row_source(tmp_path / "fv.parquet", val_fraction=0.0, ratings=RatingFilter(relevance=3))],
                         None, seed=0)
    records = [kept_first.next() for _ in range(6)]
    assert all(len(r.messages) == 2 for r in records)  # the second turn (relevance 2) is gone
    assert kept_first.counts.values == {"filtered_rows": 0, "dropped_turns": 6}
    nothing_left = Mixture([row_source(tmp_path / "fv.parquet", val_fraction=0.0,
                                       ratings=RatingFilter(image_correspondence=5))], None, seed=0)
    with pytest.raises(DataError, match="no usable training rows"):
        nothing_left.next()
    assert nothing_left.counts.values == {"filtered_rows": 6, "dropped_turns": 12}


# the hash rule holds out none of 32 rows for z.parquet (at seed 0, 5 %), and some for the others
SMALL_FILES = ["z.parquet", "a.parquet", "b.parquet", "shapes.parquet", "train.parquet"]


@pytest.mark.parametrize("name", SMALL_FILES)
def test_a_small_dataset_always_holds_out_a_row(tmp_path: Path, name: str) -> None:
    rows = open_rows(parse_source(str(write_parquet(tmp_path / name, "the_cauldron", cauldron_rows(32)))), "train")
    by_hash = {i for i in range(32) if held_out(0, rows.identity, i, 0.05)}
    chosen = {i for i in range(32) if i in HoldOut(rows, seed=0, fraction=0.05)}
    if by_hash:
        assert chosen == by_hash  # the rows the rule picks, exactly
    else:
        assert len(chosen) == 1 and name == "z.parquet"  # the rule picks none: the row of smallest hash
    held = [number(r) for r in held_out_rows(rows, seed=0, val_fraction=0.05, ratings=NO_FILTER, limit=100)]
    assert held == sorted(chosen)
    source = RowSource(rows, seed=0, index=0, block=8, val_fraction=0.05, ratings=NO_FILTER)
    trained = {number(source.next(Counts())) for _ in range(32 - len(chosen))}
    assert trained == set(range(32)) - chosen  # never trained on
    nothing = HoldOut(rows, seed=0, fraction=0.0)
    assert nothing.fallback is None and not any(i in nothing for i in range(32))


def test_a_large_dataset_holds_out_the_rows_of_the_hash_rule(folder: Path) -> None:
    rows = open_rows(parse_source(str(folder)), "train")
    rows.length = 100_000  # (as the metadata of a large dataset would say): its held-out rows stay those of the hash
    hold_out = HoldOut(rows, seed=0, fraction=0.05)
    assert hold_out.fallback is None
    assert [i for i in range(5000) if i in hold_out] == [i for i in range(5000) if held_out(0, rows.identity, i, 0.05)]


def test_a_one_row_dataset_keeps_its_row_for_training(tmp_path: Path) -> None:
    rows = open_rows(parse_source(str(write_parquet(tmp_path / "z.parquet", "the_cauldron", cauldron_rows(1)))), "train")
    assert not held_out(0, rows.identity, 0, 0.05) and 0 not in HoldOut(rows, seed=0, fraction=0.05)
