"""``AutoTokenizer`` for InterBERT folders: the text side is BERT's, so is the tokenizer (WordPiece).

With this registration a folder that holds only ``vocab.txt`` (no ``tokenizer.json``) loads through
``AutoTokenizer`` and ``AutoProcessor`` too. Imported by :mod:`interbert._auto` when transformers'
``tokenization_auto`` is, so it imports nothing but that module's own dependencies and the config.
"""

from transformers import AutoTokenizer, BertTokenizerFast

from interbert.config import InterBertConfig

AutoTokenizer.register(InterBertConfig, tokenizer_class=BertTokenizerFast, exist_ok=True)
