"""Training data: JSONL formats with field-naming errors, the SFT loss mask (assistant turns only,
per-turn opt-out) consistent with inference prompts, packing with document ids, memory-mapped
token shards with exact-duplicate removal (the prepare_data stage)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_support import build_assets

from internlm2.core.attention import DenseAttention
from internlm2.core.tokenizer import InternLM2Tokenizer
from internlm2.plugins.contract import StageInputs, local_context
from internlm2.plugins.data import formats
from internlm2.plugins.data.packing import collate, pack_samples
from internlm2.plugins.data.shards import PackedTokenDataset, ShardWriter
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
