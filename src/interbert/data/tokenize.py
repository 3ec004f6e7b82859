"""Tokenisation: fast WordPiece from a ``vocab.txt`` or a BERT folder, training a WordPiece vocabulary
from captions, and word boundaries for whole-word masking (WordPiece words; for Chinese, where BERT
splits every character, the words of ``jieba``)."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from interbert.utils.files import atomic_write_text
from interbert.utils.hub_cache import local_pretrained

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(path: str | Path, lowercase: bool = True) -> PreTrainedTokenizerBase:
    """A fast BERT WordPiece tokenizer from a BERT folder (its own config decides casing), a Hub name in
    the local Hugging Face cache (``model.from_bert=bert-base-uncased``), or a bare ``vocab.txt``
    (``lowercase`` decides). CJK characters are split one by one, as bert-base-chinese."""
    path = Path(path)
    if not path.exists():
        path = local_pretrained(path)
    if path.is_dir():
        return BertTokenizerFast.from_pretrained(str(path))
    with open(path, encoding="utf-8") as f:
        return tokenizer_from_vocab([line.rstrip("\n") for line in f], lowercase)


def tokenizer_from_vocab(vocab: list[str], lowercase: bool = True) -> PreTrainedTokenizerBase:
    """A fast BERT WordPiece tokenizer over ``vocab`` (``vocab.txt``'s lines), built in memory."""
    ids = {token: n for n, token in enumerate(vocab)}
    return BertTokenizerFast(vocab=ids, do_lower_case=lowercase, tokenize_chinese_chars=True)


def save_wordpiece(vocab: list[str], out_dir: str | Path, lowercase: bool = True) -> PreTrainedTokenizerBase:
    """Write ``vocab`` as a BERT-style tokenizer folder at ``out_dir`` (``vocab.txt`` and the tokenizer's files)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "vocab.txt", vocab_text(vocab))
    tokenizer = load_tokenizer(out_dir / "vocab.txt", lowercase=lowercase)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def vocab_text(vocab: list[str]) -> str:
    """``vocab.txt``'s content: one token a line."""
    return "".join(f"{token}\n" for token in vocab)


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 30522, lowercase: bool = True,
                    min_frequency: int = 2) -> PreTrainedTokenizerBase:
    """Train a WordPiece vocabulary on captions and save a BERT-style tokenizer folder at ``out_dir``.

    Reproducible: the same texts and settings give a byte-identical ``vocab.txt`` in every process (see
    :func:`wordpiece_vocabulary`; the ``tokenizers`` trainer breaks ties in hash order and does not)."""
    vocab = wordpiece_vocabulary(texts, vocab_size, lowercase=lowercase, min_frequency=min_frequency)
    return save_wordpiece(vocab, out_dir, lowercase)


def wordpiece_vocabulary(texts: Iterable[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 2,
                         prefix: str = "##") -> list[str]:
    """The WordPiece vocabulary of ``tokenizers``' trainer (BPE merges over BERT-normalised words), built
    deterministically: ``vocab.txt`` order is the special tokens, the alphabet (every character seen, the
    most frequent when there are more than ``vocab_size``) by code point, the ``##`` continuations seen in
    the same order, then the merged tokens in merge order; the most frequent pair merges first, ties broken by
    the ids of the pair (the library breaks them by ids assigned in hash order, so two processes can train
    different vocabularies from the same texts)."""
    word_counts = _word_counts(texts, lowercase)
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    kept = sorted(char_counts, key=lambda c: (-char_counts[c], c))[:vocab_size]  # limit_alphabet = vocab_size
    alphabet = sorted(kept)
    inner = {c for word in word_counts for c in word[1:]}  # the characters that continue a word
    vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *alphabet, *(prefix + c for c in alphabet if c in inner)]))
    ids = {token: n for n, token in enumerate(vocab)}
    # each word as symbol ids: its first character, then ##-continuations; characters off the alphabet dropped
    words, counts = [], []
    for word in sorted(word_counts):
        symbols = [ids[c if n == 0 else prefix + c] for n, c in enumerate(word) if c in ids]
        if symbols:
            words.append(symbols)
            counts.append(word_counts[word])
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, (symbols, count) in enumerate(zip(words, counts)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += count
            where.setdefault(pair, set()).add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -negative:  # stale: re-queue with the current count
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < min_frequency:
            break
        a, b = vocab[pair[0]], vocab[pair[1]]
        token = a + (b[len(prefix):] if b.startswith(prefix) else b)
        if token not in ids:
            ids[token] = len(vocab)
            vocab.append(token)
        changed = _merge(pair, ids[token], words, counts, pair_counts, where)
        for new in sorted(changed):
            if pair_counts[new] > 0:
                heapq.heappush(heap, (-pair_counts[new], new))
    return vocab


def _word_counts(texts: Iterable[str], lowercase: bool) -> Counter[str]:
    """How often each word occurs in ``texts``, normalised and split as BERT does."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    pre_tokenizer = BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return word_counts


def _merge(pair: tuple[int, int], new_id: int, words: list[list[int]], counts: list[int],
           pair_counts: Counter[tuple[int, int]], where: dict[tuple[int, int], set[int]]) -> set[tuple[int, int]]:
    """Replace ``pair`` by ``new_id`` in every word that holds it, updating the pair counts and where each pair
    occurs (in place); the pairs whose counts grew."""
    changed = set()
    for w in sorted(where.pop(pair)):
        symbols, count = words[w], counts[w]
        for old in zip(symbols, symbols[1:]):
            pair_counts[old] -= count
        merged, n = [], 0
        while n < len(symbols):
            if n + 1 < len(symbols) and (symbols[n], symbols[n + 1]) == pair:
                merged.append(new_id)
                n += 2
            else:
                merged.append(symbols[n])
                n += 1
        words[w] = merged
        for new in zip(merged, merged[1:]):
            pair_counts[new] += count
            where.setdefault(new, set()).add(w)
            changed.add(new)
    return changed


@dataclass
class EncodedText:
    input_ids: list[int]
    word_ids: list[int | None]  # None at [CLS]/[SEP]; equal ids = one word, masked together

    @property
    def maskable(self) -> list[bool]:
        return [w is not None for w in self.word_ids]


def jieba_word_ids(text: str, offsets: list[tuple[int, int]], special: list[bool]) -> list[int | None]:
    """Map each token (by its character offsets) to the jieba word that contains its first character."""
    import jieba

    word_of_char = [0] * len(text)
    for n, (_, start, end) in enumerate(jieba.tokenize(text)):
        word_of_char[start:end] = [n] * (end - start)
    return [None if is_special else word_of_char[start] for (start, _), is_special in zip(offsets, special)]


def encode_caption(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int = 36,
                   word_segmenter: str | None = None) -> EncodedText:
    """``[CLS] caption [SEP]`` truncated to ``max_tokens``; word ids from WordPiece pre-tokenisation, or
    from jieba when ``word_segmenter="jieba"`` (Chinese captions)."""
    enc = tokenizer(text, truncation=True, max_length=max_tokens, return_offsets_mapping=word_segmenter is not None,
                    return_special_tokens_mask=True)
    special = [bool(s) for s in enc["special_tokens_mask"]]
    if word_segmenter is None:
        word_ids = [None if s else w for w, s in zip(enc.word_ids(), special)]
    elif word_segmenter == "jieba":
        word_ids = jieba_word_ids(text, enc["offset_mapping"], special)
    else:
        raise ValueError(f"unknown word_segmenter {word_segmenter!r}; use None or 'jieba'")
    return EncodedText(list(enc["input_ids"]), word_ids)


def encode_captions(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int = 36,
                    word_segmenter: str | None = None) -> list[EncodedText]:
    """:func:`encode_caption` of every text, identical results; without a word segmenter the texts go
    to the fast tokenizer in one batch call (1.7x faster than one call per caption on 4,205 captions)."""
    if word_segmenter is not None or not texts:
        return [encode_caption(tokenizer, text, max_tokens, word_segmenter) for text in texts]
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens, return_special_tokens_mask=True)
    out = []
    for n, (ids, special_mask) in enumerate(zip(enc["input_ids"], enc["special_tokens_mask"])):
        special = [bool(s) for s in special_mask]
        out.append(EncodedText(list(ids), [None if s else w for w, s in zip(enc.word_ids(n), special)]))
    return out
