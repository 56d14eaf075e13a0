"""The pretraining data stream: formats, filters, crop, sharding, order, exact resume, exclusion, bad input;
and the micro-batch pipeline on top of it (ranks, workers, resume)."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from protlm.data import read_fasta
from protlm.data.exclude import Exclusion, id_keys
from protlm.data.stream import SequenceStream, Shard
from protlm.errors import CheckpointError, ConfigError, InputError
from protlm.objectives import ObjectiveConfig, PretrainBatches, TaskMixer
from protlm.tokenizer.vocab import protlm_tokenizer
from tests.conftest import DATA

TOK = protlm_tokenizer()
CATH = os.path.join(DATA, "cath_s20_excerpt.fasta")  # 120 records
ECOLI = os.path.join(DATA, "ecoli_k12_excerpt.fasta")  # 80 records
ECOLI_GZ = os.path.join(DATA, "ecoli_k12_excerpt.fasta.gz")
RECORDS = {r.id: r.sequence for path in (CATH, ECOLI) for r in read_fasta(path)}


def seqs(items):
    return [TOK.decode(i.residues) for i in items]


def all_items(stream, shard=None):
    return list(stream.items(shard))


# --- formats -------------------------------------------------------------------------------------------------
def test_fasta_plain_and_gzip_in_file_order():
    items = all_items(SequenceStream([CATH, ECOLI_GZ], TOK, max_length=100_000, shuffle=False, epochs=1))
    assert [i.record_id for i in items] == list(RECORDS)
    assert seqs(items) == list(RECORDS.values())
    assert [i.position for i in items] == list(range(200))


def _write_tables(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, sequences = list(RECORDS), list(RECORDS.values())
    table = pa.table({"accession": ids, "sequence": sequences, "length": [len(s) for s in sequences]})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=37)  # several row groups
    datasets.Dataset.from_dict({"id": ids, "seq": sequences}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": ids[:50], "seq": sequences[:50]})}).save_to_disk(
        str(tmp_path / "dd"))
    return tmp_path / "corpus.parquet", tmp_path / "ds", tmp_path / "dd"


def test_parquet_and_datasets_directory(tmp_path):
    parquet, ds, dd = _write_tables(tmp_path)
    p = SequenceStream(parquet, TOK, max_length=100_000, shuffle=False, epochs=1)
    assert len(p.units) == 6  # 200 rows / 37 per row group
    items = all_items(p)
    assert [i.record_id for i in items] == list(RECORDS) and seqs(items) == list(RECORDS.values())
    h = SequenceStream(str(ds), TOK, max_length=100_000, shuffle=False, epochs=1)
    items = all_items(h)
    assert [i.record_id for i in items] == list(RECORDS) and seqs(items) == list(RECORDS.values())
    d = all_items(SequenceStream(str(dd), TOK, max_length=100_000, shuffle=False, epochs=1))
    assert seqs(d) == list(RECORDS.values())[:50]
    with pytest.raises(InputError, match=r"dd: no split 'valid' \(splits: train\)"):
        SequenceStream(str(dd), TOK, split="valid")
    with pytest.raises(InputError, match=r"corpus.parquet: no column 'protein' \(columns: accession, sequence, length\)"):
        SequenceStream(parquet, TOK, sequence_column="protein")


def test_uniref50_headers_and_exclusion_by_member_accession(tmp_path):
    fa = tmp_path / "uniref50.fasta"
    fa.write_text(">UniRef50_P69905 Hemoglobin subunit alpha n=2 Tax=Homo sapiens TaxID=9606 RepID=HBA_HUMAN\n"
                  "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL\n"
                  "RVDPVNFKLLSHCLLVTLAAHLPAEFTPAVHASLDKFLASVSTVLTSKYR\n"
                  ">UniRef50_A0A5A9P0L4 Uncharacterized protein n=1 Tax=Triplophysa tibetana TaxID=1572043\n"
                  "MKTAYIAKQRQISFVKSHFSRQ\n")
    items = all_items(SequenceStream(fa, TOK, shuffle=False, epochs=1))
    assert [i.record_id for i in items] == ["UniRef50_P69905", "UniRef50_A0A5A9P0L4"]
    assert len(items[0].residues) == 142
    assert id_keys("UniRef50_P69905") == {"UniRef50_P69905", "P69905"}
    assert id_keys("sp|P0A7V8|RS4_ECOLI") == {"sp|P0A7V8|RS4_ECOLI", "P0A7V8", "RS4_ECOLI"}
    kept = all_items(SequenceStream(fa, TOK, epochs=1, exclude=Exclusion(ids=["P69905"])))
    assert [i.record_id for i in kept] == ["UniRef50_A0A5A9P0L4"]


# --- filters and crop ----------------------------------------------------------------------------------------
def test_length_filters_and_counts():
    lengths = [len(s) for s in RECORDS.values()]
    s = SequenceStream([CATH, ECOLI], TOK, max_length=100_000, min_length=100, drop_longer_than=300, epochs=1)
    got = sorted(len(i.residues) for i in s.items())
    assert got == sorted(n for n in lengths if 100 <= n <= 300)
    assert s.stats.dropped == {"shorter than min_length": sum(n < 100 for n in lengths),
                               "longer than drop_longer_than": sum(n > 300 for n in lengths)}
    with pytest.raises(ConfigError, match="data.drop_longer_than must be an integer >= 100"):
        SequenceStream(CATH, TOK, min_length=100, drop_longer_than=50)


def test_random_crop_keeps_room_for_specials_and_is_a_window():
    s = SequenceStream([CATH, ECOLI], TOK, max_length=60, epochs=2, seed=4)
    items = all_items(s)
    starts = []
    for item in items:
        full = RECORDS[item.record_id]
        text = TOK.decode(item.residues)
        assert len(item.residues) == min(58, len(full))  # max_length minus [prefix] and </s>
        assert text in full
        if len(full) > 58:
            starts.append(full.find(text) / (len(full) - 58))
    # crop starts spread over the whole allowed range, and the same protein is cropped anew each epoch
    assert 0.4 < np.mean(starts) < 0.6 and min(starts) < 0.05 and max(starts) > 0.95
    by_id = {}
    for item in items:
        by_id.setdefault(item.record_id, []).append(TOK.decode(item.residues))
    long_ids = [k for k, v in RECORDS.items() if len(v) > 200]
    assert sum(by_id[k][0] != by_id[k][1] for k in long_ids) > 0.9 * len(long_ids)
    again = all_items(SequenceStream([CATH, ECOLI], TOK, max_length=60, epochs=2, seed=4))
    assert seqs(again) == seqs(items)  # deterministic per seed


# --- order and sharding --------------------------------------------------------------------------------------
def test_order_is_deterministic_per_seed_and_each_epoch_is_a_permutation():
    def run(seed):
        return [i.record_id for i in SequenceStream([CATH, ECOLI], TOK, seed=seed, epochs=3, block_size=64).items()]

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    epochs = [a[i * 200 : (i + 1) * 200] for i in range(3)]
    assert all(sorted(e) == sorted(RECORDS) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0][:20] != list(RECORDS)[:20]  # shuffled, not file order


@pytest.mark.parametrize("world_size,workers,chunk", [(2, 1, 1), (3, 2, 1), (2, 2, 5)])
def test_shards_do_not_overlap_and_cover_everything(world_size, workers, chunk):
    reference = all_items(SequenceStream([CATH, ECOLI], TOK, epochs=2, block_size=50, seed=3))
    got = []
    for rank in range(world_size):
        stream = SequenceStream([CATH, ECOLI], TOK, epochs=2, block_size=50, seed=3, rank=rank, world_size=world_size)
        for worker in range(workers):
            got += all_items(stream, Shard(rank, world_size, worker, workers, chunk))
    assert sorted(i.position for i in got) == list(range(400))
    by_pos = {i.position: i for i in reference}
    assert all(by_pos[i.position].record_id == i.record_id and np.array_equal(by_pos[i.position].residues, i.residues)
               for i in got)


def test_dataloader_workers_shard_the_stream():
    stream = SequenceStream([CATH, ECOLI], TOK, max_length=100_000, epochs=1, block_size=64, seed=5)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = sorted(TOK.decode(r) for r in loader)
    assert got == sorted(RECORDS.values())  # every record once, none twice


# --- resume --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [1, 49, 50, 123, 200, 371])
def test_state_dict_resumes_exactly(tmp_path, cut):
    parquet, _, _ = _write_tables(tmp_path)
    paths = [CATH, parquet, ECOLI_GZ]  # blocks of 50 span files and row groups

    def make():
        return SequenceStream(paths, TOK, max_length=80, epochs=2, block_size=50, seed=9, rank=1, world_size=2)

    full = all_items(make())
    first = make()
    it = first.items()
    head = [next(it) for _ in range(cut // 2)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    rest = all_items(resumed)
    both = head + rest
    assert [i.position for i in both] == [i.position for i in full]
    assert all(np.array_equal(a.residues, b.residues) for a, b in zip(both, full))


def test_resume_refuses_other_settings_or_layout():
    s = SequenceStream(CATH, TOK, seed=1, block_size=50)
    it = s.items()
    next(it)
    state = s.state_dict()
    with pytest.raises(CheckpointError, match=r"saved with seed=1, but this run has 2"):
        SequenceStream(CATH, TOK, seed=2, block_size=50).load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"saved with min_length=2, but this run has 5"):
        SequenceStream(CATH, TOK, seed=1, block_size=50, min_length=5).load_state_dict(state)
    other = SequenceStream(CATH, TOK, seed=1, block_size=50)
    other.load_state_dict(state)
    with pytest.raises(CheckpointError, match="saved for 1 shards .* this run reads 2"):
        other.items(Shard(0, 2))


# --- exclusion -----------------------------------------------------------------------------------------------
def test_exclusion_by_ids_and_exact_sequences(tmp_path):
    eco = list(read_fasta(ECOLI))
    id_file = tmp_path / "ids.txt"
    id_file.write_text("# evaluation proteins\n" + eco[0].id.split("|")[1] + "\n" + list(RECORDS)[0] + "\n")
    held_out = tmp_path / "test_set.fasta"
    held_out.write_text("".join(f">test{i}\n{r.sequence.lower()}\n" for i, r in enumerate(eco[10:15])))
    exclude = Exclusion.from_files(id_files=[id_file], sequence_files=[held_out])
    s = SequenceStream([CATH, ECOLI], TOK, max_length=100_000, epochs=1, exclude=exclude)
    got = {i.record_id for i in s.items()}
    removed = {eco[0].id, list(RECORDS)[0]} | {r.id for r in eco[10:15]}
    assert got == set(RECORDS) - removed
    assert s.stats.dropped == {"excluded id": 2, "excluded sequence": 5}
    # the exclusion list is part of the settings a resume must match
    plain = SequenceStream([CATH, ECOLI], TOK)
    plain_state = plain.state_dict()
    with pytest.raises(CheckpointError, match="saved with exclude=None"):
        SequenceStream([CATH, ECOLI], TOK, exclude=exclude).load_state_dict(plain_state)


def test_exclusion_drops_near_copies_by_shared_kmers(tmp_path):
    from protlm.data.exclude import SharedSegments

    records = list(read_fasta(ECOLI))
    eco = {r.id: r.sequence for r in records}
    short, tagged, long, other = (records[i].id for i in (5, 7, 71, 4))  # 86, 159, 574 and 167 residues
    tag = "MGSSHHHHHHSSGLVPRGSH"  # a common expression tag: shared by many unrelated chains
    held_out = tmp_path / "eval.fasta"
    held_out.write_text(
        f">domain\n{eco[short][:55]}\n"  # a domain cut from `short`: 46 of its 77 10-mers (60%)
        f">tagged\n{tag}{eco[tagged]}\n"  # `tagged` with a tag: all 150 of its 10-mers
        f">inside\n{eco[long][100:170]}\n"  # 70 residues inside `long`: 61 of its 565 10-mers (11%)
        f">tag-only\n{tag}MKTAYIAKQRQISFVKSHFSRQ\n")
    near = Exclusion.from_files(sequence_files=[held_out], near=SharedSegments(k=10, fraction=0.5, count=50))
    assert near.shared_kmers(eco[short]) == (46, 77)  # the fraction rule
    assert near.shared_kmers(eco[tagged]) == (150, 150)
    assert near.shared_kmers(eco[long]) == (61, 565)  # the count rule
    assert {near.reason(eco[i]) for i in (short, tagged, long)} == {"shares segments with an excluded sequence"}
    assert near.shared_kmers(tag + eco[other]) == (12, 178)  # the tag, and the tag + the first residue M
    assert near.reason(tag + eco[other]) is None
    s = SequenceStream([ECOLI], TOK, max_length=100_000, epochs=1, exclude=near)
    assert {i.record_id for i in s.items()} == set(eco) - {short, tagged, long}
    assert s.stats.dropped == {"shares segments with an excluded sequence": 3}
    # exact matching alone keeps all three; k = 0 switches the rule off
    for exact in (Exclusion.from_files(sequence_files=[held_out]),
                  Exclusion.from_files(sequence_files=[held_out], near=SharedSegments(k=0))):
        assert all(exact.reason(eco[i]) is None for i in (short, tagged, long))
    # the rule is part of what a resumed stream must match
    assert near.fingerprint() != Exclusion.from_files(sequence_files=[held_out]).fingerprint()


def test_near_copy_thresholds_are_checked_with_the_config_key():
    from protlm.train.config import load_config

    with pytest.raises(ConfigError, match="data.exclude_kmer.*0 \\(off\\) to 12, got 16"):
        load_config(None, ["data.exclude_kmer=16"])
    with pytest.raises(ConfigError, match="fraction in \\(0, 1\\]"):
        load_config(None, ["data.exclude_kmer_fraction=1.5"])


# --- bad records and bad input -------------------------------------------------------------------------------
def test_bad_record_policies(tmp_path):
    fa = tmp_path / "bad.fa"
    fa.write_text(">ok1\nMKTAYI\n>empty\n>gap\nMK-TA\n>digit\nMK1AY\n>ok2\nGGSGG*\n")
    with pytest.raises(InputError, match=r"bad.fa: record 'empty' \(line 3\): empty sequence"):
        all_items(SequenceStream(fa, TOK, policy="error", shuffle=False))
    gap = tmp_path / "gap.fa"
    gap.write_text(">ok1\nMKTAYI\n>gap\nMK-TA\n")
    with pytest.raises(InputError, match=r"gap.fa: record 'gap' \(line 3\): unknown residue '-' at position 3"):
        all_items(SequenceStream(gap, TOK, policy="error", shuffle=False))
    s = SequenceStream(fa, TOK, policy="skip", shuffle=False, epochs=1)
    with pytest.warns(UserWarning) as caught:
        got = all_items(s)
    assert [i.record_id for i in got] == ["ok1", "ok2"] and TOK.decode(got[1].residues) == "GGSGG"
    assert s.stats.dropped == {"empty": 1, "invalid characters": 2}
    messages = [str(w.message) for w in caught]
    assert "record 'empty' (line 3): empty sequence; skipping it" in messages[0]
    assert messages[-1].endswith("bad.fa: first pass done; 5 records read, 2 kept, 1 empty, 2 invalid characters")
    x = SequenceStream(fa, TOK, policy="x", shuffle=False, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert seqs(all_items(x)) == ["MKTAYI", "MKTA", "MKXAY", "GGSGG"]
    assert x.stats.repaired == 2


def test_bad_input_names_the_file(tmp_path):
    (tmp_path / "empty.fa").write_bytes(b"")
    (tmp_path / "text.fa").write_text("MKTAYI\n")
    (tmp_path / "blank.fa").write_text("\n\n")
    with open(ECOLI_GZ, "rb") as fh:
        (tmp_path / "broken.fa.gz").write_bytes(fh.read()[:5000])  # cut mid-stream
    (tmp_path / "x.csv").write_text("id,sequence\na,MK\n")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "junk.parquet").write_text("not parquet")
    (tmp_path / "short.fa").write_text(">a\nMK\n>b\nMKT\n")
    cases = [
        (tmp_path / "missing.fa", r"missing.fa: no such file"),
        (tmp_path / "empty.fa", r"empty.fa: empty file"),
        (tmp_path / "blank.fa", r"blank.fa: empty file \(no FASTA records\)"),
        (tmp_path / "text.fa", r"text.fa: does not start with a '>' header"),
        (tmp_path / "x.csv", r"x.csv: training data must be FASTA, parquet or a datasets directory"),
        (tmp_path / "nothing", r"nothing: directory holds no FASTA or parquet files"),
        (tmp_path / "junk.parquet", r"junk.parquet: not a readable parquet file"),
        (str(tmp_path / "*.fasta"), r"\*.fasta: no files match"),
    ]
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            SequenceStream(path, TOK)
    with pytest.raises(InputError, match=r"broken.fa.gz: compressed file is truncated or corrupt"):
        all_items(SequenceStream(tmp_path / "broken.fa.gz", TOK))
    with pytest.raises(InputError, match=r"short.fa: no usable sequences \(2 records read, 0 kept, 2 shorter than"):
        next(iter(SequenceStream(tmp_path / "short.fa", TOK, min_length=10)))
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.fa"
        locked.write_text(">a\nMK\n")
        locked.chmod(0)
        with pytest.raises(InputError, match="locked.fa: cannot read"):
            SequenceStream(locked, TOK)
    for key, value, message in [("max_length", "512", "data.max_length must be an integer >= 3, got '512'"),
                                ("policy", "maybe", "data.policy must be one of skip, error, x"),
                                ("rank", 2, "data: rank 2 is not below world_size 2")]:
        kwargs = {"world_size": 2, key: value}
        with pytest.raises(ConfigError, match=message):
            SequenceStream(CATH, TOK, **kwargs)


# --- micro-batches: ranks, workers, resume -------------------------------------------------------------------
def _batches(rank=0, world_size=1, batch_size=8, accumulation=2):
    stream = SequenceStream([CATH, ECOLI_GZ], TOK, max_length=64, block_size=50, seed=3, rank=rank,
                            world_size=world_size)
    return PretrainBatches(stream, TaskMixer(ObjectiveConfig(), TOK, 64), batch_size, accumulation)


def _take(batches, n, workers=0):
    return [b for _, b in zip(range(n), batches.loader(workers))]  # range first: never pull a batch too many


def _rows(batch):
    return sorted((tuple(x[x != 0].tolist()), tuple(y[y != -100].tolist()))
                  for x, y in zip(batch["input_ids"], batch["labels"]))


def test_two_ranks_see_the_same_global_batches_as_one():
    one = _take(_batches(batch_size=8), 30)
    two = [_take(_batches(rank, 2, batch_size=4), 30) for rank in range(2)]
    for m in range(30):
        assert _rows(one[m]) == sorted(_rows(two[0][m]) + _rows(two[1][m]))
        assert one[m]["mask_rate"] == two[0][m]["mask_rate"] == two[1][m]["mask_rate"]
        assert one[m]["step"] == m // 2
    assert len({b["mask_rate"] for b in one}) == 3
    # the saved position is global: a 2-rank run resumes on 1 rank with the same global batch
    rank1 = _batches(1, 2, batch_size=4)
    _take(rank1, 11)
    single = _batches(batch_size=8)
    single.load_state_dict(json.loads(json.dumps(rank1.state_dict())))
    assert [_rows(b) for b in _take(single, 5)] == [_rows(b) for b in one[11:16]]


def test_workers_and_resume_give_the_same_batches():
    reference = _take(_batches(), 30)
    with_workers = _take(_batches(), 30, workers=2)
    for a, b in zip(reference, with_workers):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    for workers_before, workers_after in [(2, 0), (0, 2), (2, 2)]:
        first = _batches()
        _take(first, 17, workers=workers_before)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["consumed"] == 17
        resumed = _batches()
        resumed.load_state_dict(state)
        for a, b in zip(reference[17:], _take(resumed, 13, workers=workers_after)):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    other = _batches(batch_size=4)
    with pytest.raises(CheckpointError, match="saved with global_batch=8, but this run has 4"):
        other.load_state_dict(state)


def test_position_generators_are_reproducible_and_distinct():
    from protlm.data.rng import PositionRNG, position_generator

    reused = PositionRNG(7, 99)
    draws = {p: reused.at(p).random(4).tolist() for p in (0, 1, 2**40, 5)}
    assert reused.at(1).random(4).tolist() == draws[1] == position_generator(7, 99, 1).random(4).tolist()
    assert len({tuple(d) for d in draws.values()}) == 4
    assert PositionRNG(8, 99).at(1).random(4).tolist() != draws[1]  # the seed matters
    assert PositionRNG(7, 98).at(1).random(4).tolist() != draws[1]  # and the purpose
