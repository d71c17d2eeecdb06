"""Training data: JSONL formats with field-naming errors, the SFT loss mask (assistant turns only,
per-turn opt-out) consistent with inference prompts, packing with document ids (best-fit decreasing,
O(n log n) by its probe count), memory-mapped token shards with exact-duplicate removal and SFT rows
packed once (the prepare_data stage)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from training_support import build_assets

from internlm2.core.attention import DenseAttention
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.contract import StageInputs, local_context
from internlm2.plugins.data import formats
from internlm2.plugins.data.chat_rows import chat_rows
from internlm2.plugins.data.packing import collate, pack_lengths, pack_samples
from internlm2.plugins.data.shards import PackedRowDataset, PackedTokenDataset, ShardWriter
from internlm2.plugins.data.tokenize import IGNORE, prompt_ids, tokenize_chat
from internlm2.plugins.registry import get_stage

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def tok(assets):
    return InternLM2Tokenizer.from_pretrained(assets.base)


def test_formats_doc_has_an_example_of_every_format():
    doc = formats.FORMATS_DOC.read_text()
    for needle in ('{"text":', '{"messages": [', '"loss": false', '"chosen"', '"rejected"', '"condition"',
                   "meta.json"):
        assert needle in doc


@pytest.mark.parametrize("line, field", [
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "messages"),
    ('{"messages": [{"role": "assistant", "content": "x", "loss": "no"}]}', "messages[0].loss"),
    ("[1, 2]", "line"),
    ("{bad json", "line"),
])
def test_chat_records_are_validated_with_line_and_field(tmp_path, line, field):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n\n'
                    + line + "\n")
    with pytest.raises(formats.DataFormatError) as err:
        formats.load_chat(path)
    assert err.value.where == "chat.jsonl:3" and err.value.field == field


def test_preference_records(tmp_path):
    path = tmp_path / "pref.jsonl"
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}], "condition": "helpful"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "condition": 3}) + "\n")
    with pytest.raises(formats.DataFormatError, match=r"pref\.jsonl:2: condition"):
        formats.load_preferences(path)
    path.write_text(json.dumps(good) + "\n")
    assert formats.load_preferences(path)[0]["condition"] == "helpful"


def test_sft_loss_mask_covers_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "capital of zorbia?"},
        {"role": "assistant", "content": "velm", "loss": False},
        {"role": "user", "content": "capital of quenland?"},
        {"role": "assistant", "content": "arno"},
    ]
    ids, targets = tokenize_chat(tok, messages)
    # The token sequence is the official chat rendering.
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    learned = [t for t in targets if t != IGNORE]
    assert tok.decode(learned) == "arno<|im_end|>"
    # The prompt of the last turn, as inference builds it, is exactly the context before "arno".
    first_target = next(i for i, t in enumerate(targets) if t != IGNORE)
    assert ids[:first_target] == prompt_ids(tok, messages[:4])
    _, targets2 = tokenize_chat(tok, [*messages[:2], {"role": "assistant", "content": "velm"}])
    assert tok.decode([t for t in targets2 if t != IGNORE]) == "velm<|im_end|>"


def test_packing_keeps_samples_apart(tok):
    samples = [tokenize_chat(tok, [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
               for i in range(5)]
    lengths = [len(s[0]) for s in samples]
    rows, truncated = pack_samples(samples, max_len=2 * max(lengths) + 1, pad_id=tok.pad_id)
    assert truncated == 0 and len(rows) < len(samples)
    batch = collate(rows)
    assert batch["input_ids"].shape == batch["position_ids"].shape
    packed_targets = sum(int((r.labels != IGNORE).sum()) for r in rows)
    assert packed_targets == sum(sum(t != IGNORE for t in s[1][1:]) for s in samples)
    row = rows[0]
    starts = np.flatnonzero(np.diff(row.doc_ids, prepend=-1))
    assert batch["position_ids"][0, starts].tolist() == [0] * len(starts)
    # No label points across a document boundary.
    boundary = np.flatnonzero(row.doc_ids[1:] != row.doc_ids[:-1])
    assert all(row.labels[i] == IGNORE for i in boundary)
    # The packed forward of sample 1 equals its forward alone.
    from internlm2.core import InternLM2Config, random_model

    model = random_model(InternLM2Config.preset("tiny", vocab_size=tok.vocab_size))
    packed = model(batch["input_ids"][:1], batch["position_ids"][:1], attn=DenseAttention(doc_ids=batch["doc_ids"][:1]))
    alone = model(torch.tensor([samples[1][0]]))
    s, n = starts[1], lengths[1]
    torch.testing.assert_close(packed[0, s:s + n], alone[0], rtol=1e-4, atol=1e-5)


def test_shards_roundtrip_with_document_ids(tmp_path):
    writer = ShardWriter(tmp_path / "ds", shard_tokens=1024)  # several shards
    docs = [list(range(1 + i, 1 + i + n)) for i, n in enumerate([300, 500, 700, 50, 900, 20])]
    for d in docs:
        writer.add(d)
    meta = writer.close()
    assert len(meta["shards"]) > 1 and meta["num_tokens"] == sum(map(len, docs))
    ds = PackedTokenDataset(tmp_path / "ds", seq_len=128)
    stream = np.concatenate([np.asarray(d) for d in docs])
    doc_of = np.concatenate([np.full(len(d), k) for k, d in enumerate(docs)])
    assert len(ds) == len(stream) // 128
    for i in (0, 3, 7, len(ds) - 1):
        row = ds[i]
        span = slice(i * 128, (i + 1) * 128)
        assert (row.input_ids == stream[span]).all()
        assert (row.doc_ids == doc_of[span] - doc_of[span][0]).all()
        same = doc_of[span][1:] == doc_of[span][:-1]
        assert (row.labels[:-1][same] == stream[span][1:][same]).all()
        assert (row.labels[:-1][~same] == IGNORE).all() and row.labels[-1] == IGNORE


def test_prepare_data_stage_dedups_and_shards(assets, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "doc.txt").write_text("a whole text file is one document")
    (extra / "dup.jsonl").write_text(2 * (json.dumps({"text": "alpha beta"}) + "\n"))
    stage = get_stage("prepare_data")
    ctx = local_context(stage, {"sources": [str(assets.corpus), "input:more"]}, tmp_path / "out",
                        inputs=StageInputs(checkpoints={"base": assets.base}, datasets={"more": extra}))
    result = stage.run(ctx)
    texts = [json.loads(line)["text"] for line in assets.corpus.read_text().splitlines()]
    unique = len(set(texts)) + 2
    assert result["documents"] == unique and result["duplicates_removed"] == len(texts) + 3 - unique
    meta = json.loads((tmp_path / "out" / "dataset" / "meta.json").read_text())
    tok = InternLM2Tokenizer.from_pretrained(assets.base)
    first = np.fromfile(tmp_path / "out" / "dataset" / meta["shards"][0]["tokens"], dtype=np.uint32)
    offsets = np.load(tmp_path / "out" / "dataset" / meta["shards"][0]["offsets"])
    doc0 = first[offsets[0]:offsets[1]].tolist()
    assert doc0[0] == tok.bos_id and doc0[-1] == tok.eos_id and tok.decode(doc0[1:-1]) == texts[0]
    assert [a["name"] for a in ctx.channel.of_type("artifact")] == ["dataset"]
    # A second attempt reuses the finished output.
    again = local_context(stage, {"sources": [str(assets.corpus)]}, tmp_path / "out",
                          inputs=StageInputs(checkpoints={"base": assets.base}))
    assert stage.run(again) == {}


def test_best_fit_decreasing_packs_every_sample_once_and_tightly():
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(1, 600, 3000).tolist(), 900, 1100]  # two over max_len: truncated
    bins = pack_lengths(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(min(lengths[i], 512) for i in b) <= 512 for b in bins)
    lower_bound = -(-sum(min(n, 512) for n in lengths) // 512)
    assert len(bins) <= 1.02 * lower_bound + 1  # within 2% of the ideal row count


def test_packing_work_grows_as_n_log_n_on_200k_samples():
    """Probes of the capacity search (bisect comparisons, counted through its key) per sample stay bounded
    by the log of the distinct capacities: 200k samples cost ~10x 20k, where first-fit over all rows
    (the old packer: one probe per open row) costs ~100x."""
    rng = np.random.default_rng(1)
    max_len = 2048
    work = {}
    for n in (20_000, 200_000):
        probes = 0

        def count(x):
            nonlocal probes
            probes += 1
            return x

        lengths = rng.integers(16, 1500, n).tolist()
        bins = pack_lengths(lengths, max_len, key=count)
        assert sum(len(b) for b in bins) == n
        work[n] = probes
    assert work[200_000] / 200_000 <= 2 * (np.log2(max_len) + 2)  # a bisection, then an insertion
    assert work[200_000] / work[20_000] < 15  # linear in n here; first-fit would be ~100


def test_prepare_data_packs_chat_once_and_sft_reads_the_same_rows(assets, tok, tmp_path):
    stage = get_stage("prepare_data")
    ctx = local_context(stage, {"sources": [str(assets.chat)], "format": "chat", "max_length": 64},
                        tmp_path / "out", inputs=StageInputs(checkpoints={"base": assets.base}))
    result = stage.run(ctx)
    folder = tmp_path / "out" / "dataset"
    conversations = formats.load_chat(assets.chat)
    unique, seen = [], set()
    for c in conversations:  # the stage keeps the first of exact duplicates
        if json.dumps(c, sort_keys=True) not in seen:
            seen.add(json.dumps(c, sort_keys=True))
            unique.append(c)
    assert result["conversations"] == len(unique) and result["duplicates_removed"] == len(conversations) - len(unique)
    for name in ("input_ids", "labels", "doc_ids"):
        assert np.load(folder / f"{name}.npy", mmap_mode="r").dtype == np.int32
    prepared, info = chat_rows(tok, folder, 64)
    assert info["prepared"] and isinstance(prepared, PackedRowDataset) and len(prepared) == result["rows"]
    expected, _ = pack_samples([tokenize_chat(tok, c) for c in unique], 64, tok.pad_id)
    assert len(expected) == len(prepared)
    for want, got in zip(expected, (prepared[i] for i in range(len(prepared)))):
        for name in ("input_ids", "labels", "doc_ids"):
            assert (getattr(got, name) == getattr(want, name)).all() and getattr(got, name).dtype == np.int64
    with pytest.raises(ValueError, match="max_length"):
        chat_rows(tok, folder, 128)


@pytest.mark.timeout(300)
def test_sft_trains_from_the_prepared_rows(assets, tmp_path):
    prepare = get_stage("prepare_data")
    ctx = local_context(prepare, {"sources": [str(assets.chat)], "format": "chat", "max_length": 64},
                        tmp_path / "prep", inputs=StageInputs(checkpoints={"base": assets.base}))
    prepare.run(ctx)
    from internlm2.plugins.contract import ArtifactKind, ArtifactRef, StageOutput

    prepared = StageOutput("prepare_data", "prepare_data", tmp_path / "prep", {"dataset": ArtifactRef(
        "dataset", ArtifactKind.OTHER, tmp_path / "prep" / "dataset")})
    sft = get_stage("sft")
    run = local_context(sft, {"data": "stage:prepare_data", "max_length": 64, "max_steps": 2, "micro_batch_size": 2,
                              "checkpoint_every": 0, "zero_stage": 2, "tensorboard": False}, tmp_path / "sft",
                        inputs=StageInputs(checkpoints={"base": assets.base}, previous=(prepared,)))
    result = sft.run(run)
    assert math.isfinite(result["loss"])  # it trained on the rows
    assert any("prepared into" in e["message"] for e in run.channel.of_type("log"))
    assert (tmp_path / "sft" / "final" / "config.json").exists()
