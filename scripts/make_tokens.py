#!/usr/bin/env python3
"""Turn text files into a token file for ``data.name: tokens`` (docs/lm.md, "Token files").

    STDLIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    python scripts/make_tokens.py --out runs/tokens/stdlib.bin "$STDLIB"/*.py

Inputs are text files, or folders whose ``--suffix`` files (default ``.py`` and ``.txt``) are
read in path order. The ids go to ``--out`` as a flat ``uint16`` array (``uint32`` past 65,536
ids), written file by file (never all in memory), with ``OUT.json`` beside it stating the dtype
and the vocabulary. The tokenizer (``--tokenizer``):

* ``bpe``: a byte-level BPE of ``--vocab-size`` ids trained on these files with Hugging Face
  ``tokenizers`` (``pip install 'distgrow[tokens]'``; nothing is downloaded), saved as
  ``OUT.tokenizer.json``; an ``<|endoftext|>`` id (0) ends each file;
* a path to a ``tokenizer.json`` you already have (e.g. the one a ``bpe`` run saved: encode the
  validation text with the training text's tokenizer);
* ``bytes``: each byte is its id (0-255, no tokenizer, as ``data.name: text`` reads text);
* ``auto`` (the default): ``bpe`` when ``tokenizers`` is installed, else ``bytes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

END_OF_TEXT = "<|endoftext|>"


def text_files(inputs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """The files of ``inputs``: each file as it is, each folder's ``suffixes`` files (recursive),
    in path order."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        else:
            raise SystemExit(f"make_tokens: {path} is neither a file nor a folder; fix the path.")
    if not files:
        raise SystemExit(
            f"make_tokens: no {'/'.join(suffixes)} files in {' '.join(inputs)}; pass files, or "
            "folders holding some (--suffix picks other endings)."
        )
    return files


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        return None
    return tokenizers


def train_bpe(files: list[Path], vocab_size: int) -> Any:
    """A GPT-2-style byte-level BPE of ``vocab_size`` ids trained on ``files``."""
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # From decoded text, file by file: bytes that are not UTF-8 become U+FFFD, as when encoding.
    tokenizer.train_from_iterator((_text(f) for f in files), trainer, length=len(files))
    return tokenizer


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def encoded(files: list[Path], tokenizer: Any | None) -> Iterator[np.ndarray]:
    """The ids of each file in turn (bytes as ids when ``tokenizer`` is None)."""
    end = None if tokenizer is None else tokenizer.token_to_id(END_OF_TEXT)
    for path in files:
        if tokenizer is None:
            yield np.frombuffer(path.read_bytes(), dtype=np.uint8)
            continue
        ids = tokenizer.encode(_text(path)).ids
        yield np.asarray([*ids, *([] if end is None else [end])], dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="text files, or folders of them")
    parser.add_argument("--out", required=True, help="the token file to write (.bin)")
    parser.add_argument(
        "--tokenizer", default="auto", help="auto, bpe, bytes, or a tokenizer.json file"
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="bpe: ids (default 4096)")
    parser.add_argument(
        "--suffix", action="append", help="file endings read in folders (default .py and .txt)"
    )
    args = parser.parse_args(argv)
    files = text_files(args.inputs, tuple(args.suffix or (".py", ".txt")))
    out = Path(args.out)
    kind = args.tokenizer
    if kind == "auto":
        kind = "bpe" if _tokenizers() is not None else "bytes"
    tokenizer: Any | None = None
    saved: str | None = None
    if kind == "bytes":
        vocab = 256
    else:
        tk = _tokenizers()
        if tk is None:
            raise SystemExit(
                f"make_tokens: --tokenizer {kind} needs Hugging Face tokenizers, which is not "
                "installed: pip install 'distgrow[tokens]', or use --tokenizer bytes."
            )
        if kind == "bpe":
            if not 257 <= args.vocab_size <= 1 << 32:
                raise SystemExit(
                    f"make_tokens: --vocab-size {args.vocab_size} must be at least 257 (the 256 "
                    "bytes and <|endoftext|>); e.g. 4096."
                )
            tokenizer = train_bpe(files, args.vocab_size)
            saved = str(out.with_name(out.name + ".tokenizer.json"))
        else:
            path = Path(kind).expanduser()
            if not path.is_file():
                raise SystemExit(
                    f"make_tokens: --tokenizer {kind} is not auto, bpe, bytes or a file; point it "
                    "at a tokenizer.json."
                )
            tokenizer = tk.Tokenizer.from_file(str(path))
            saved = str(path)
        vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("wb") as f:
        for ids in encoded(files, tokenizer):
            f.write(ids.astype(dtype).tobytes())
            count += len(ids)
    if tokenizer is not None and kind == "bpe" and saved is not None:
        tokenizer.save(saved)
    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokens": count,
        "tokenizer": "bytes" if tokenizer is None else saved,
        "files": len(files),
    }
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(
        f"make_tokens: {count:,} {dtype.name} ids of {len(files)} file(s) -> {out} "
        f"(vocabulary {vocab:,}, tokenizer {meta['tokenizer']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
