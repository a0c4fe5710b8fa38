"""Report tokenizer: train a BERT-style WordPiece on the train split's reports, or load a local
Hugging Face tokenizer (a tokenizer.json, or a folder with tokenizer.json or vocab.txt). Never
downloads anything."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from cxrfast.shards.schema import REQUIRED_SPECIAL, TEXTS

SPECIAL_TOKENS: dict[str, str] = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def _bert_template(tok: Tokenizer) -> processors.TemplateProcessing:
    """BERT's `[CLS] $A [SEP]`, or `[CLS] $A` for a tokenizer without [SEP] (MRM's)."""
    cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
    if tok.token_to_id(sep) is None:
        return processors.TemplateProcessing(single=f"{cls} $A", special_tokens=[(cls, tok.token_to_id(cls))])
    return processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )


def _bert_wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int = 30000, *, workdir: Path | None = None) -> Tokenizer:
    """A lower-case BERT WordPiece tokenizer trained on `texts` ([PAD]=0, [UNK], [CLS], [SEP], [MASK]).

    Deterministic: `tokenizers`' trainer gives the `##x` continuation tokens ids in hash-map order
    (huggingface/tokenizers#1794), which also changes tie-breaks between merges. We stream the
    texts once to a temporary file while collecting their characters, register every `##c` up
    front (so ids come from a sorted list), train from the file, then make those tokens ordinary
    vocabulary entries again. Memory stays bounded whatever the number of reports.
    """
    import tempfile

    tok = _bert_wordpiece()
    chars: set[str] = set()
    n = 0
    with tempfile.TemporaryDirectory(dir=workdir, prefix="wordpiece-") as tmp:
        corpus = Path(tmp) / "train.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                norm = tok.normalizer.normalize_str(" ".join(text.split()))
                if norm:
                    chars.update(norm)
                    f.write(norm + "\n")
                    n += 1
        if n == 0:
            raise ValueError("no report text to train the tokenizer on (the train split has no reports)")
        chars -= set(" \t\n\r")
        continuation = [f"##{c}" for c in sorted(chars)]
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS.values()) + continuation,
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tok.train([str(corpus)], trainer=trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS.values()]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = _bert_template(tok)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    """A local HF tokenizer: `tokenizer.json`, or a folder holding tokenizer.json or vocab.txt
    (lower-casing from tokenizer_config.json's do_lower_case, default True). A tokenizer without
    a post-processor gets BERT's `[CLS] $A [SEP]` template, or `[CLS] $A` when it has no [SEP]
    (MRM's `mimic_wordpiece.json`: the ids are then those of MRM's `encode("[CLS] " + report)`)."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.txt").is_file():
            from tokenizers.implementations import BertWordPieceTokenizer

            lowercase = True
            cfg = path / "tokenizer_config.json"
            if cfg.is_file():
                lowercase = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
            tok = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lowercase)._tokenizer
        else:
            raise ValueError(f"--tokenizer {path}: the folder holds neither tokenizer.json nor vocab.txt")
    elif path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"--tokenizer {path}: not a Hugging Face tokenizer.json ({e})") from e
    else:
        raise ValueError(f"--tokenizer {path} does not exist")
    special_ids(tok, source=str(path))  # validates
    tok.no_padding()
    tok.no_truncation()
    if tok.post_processor is None:
        tok.post_processor = _bert_template(tok)
    return tok


def special_ids(tok: Tokenizer, *, source: str = "tokenizer") -> dict[str, int]:
    """{pad, unk, cls, mask[, sep]} -> id ("sep" only when the tokenizer has [SEP]); ValueError
    naming the missing required tokens."""
    ids = {k: tok.token_to_id(t) for k, t in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k in REQUIRED_SPECIAL if ids[k] is None]
    if missing:
        raise ValueError(f"{source}: the tokenizer lacks special tokens {missing}")
    return {k: int(v) for k, v in ids.items() if v is not None}


def tokenizer_manifest(tok: Tokenizer, file: str) -> dict:
    """The manifest's "tokenizer" entry (with the report texts every sample with a report carries)."""
    return {"file": file, "vocab_size": tok.get_vocab_size(), "special_ids": special_ids(tok), "texts": list(TEXTS)}
