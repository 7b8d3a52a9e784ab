#!/usr/bin/env bash
# Make the two token files of configs/lm_small.yaml (docs/lm.md, "A GPT-2-shaped model"):
#   code:  the Python 3.11 standard library and its test suite, every .py file of Debian 12's
#          packages libpython3.11-stdlib and libpython3.11-testsuite (PSF licence);
#   prose: the Python 3.11 documentation's reStructuredText sources (html/_sources/*.rst.txt
#          of Debian 12's python3.11-doc: the tutorial, the library reference, the HOWTOs).
# Each gets its own byte-level BPE (8192 ids, Hugging Face tokenizers: pip install
# 'distgrow[tokens]'), trained on that corpus by scripts/make_tokens.py.
#
#   bash scripts/lm_corpora.sh [OUT_DIR]      # default runs/tokens: code.bin, prose.bin (+ .json)
#
# The packages come from the machine's own apt sources (`apt-get download`: no root, nothing
# installed; dpkg-deb unpacks them into a temporary folder). Without apt, point
# scripts/make_tokens.py at any folder of .py files and at any folder of text.
set -euo pipefail
out=${1:-runs/tokens}
python=${PYTHON:-python}
vocab=${LM_VOCAB:-8192}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(
  cd "$work"
  apt-get download libpython3.11-stdlib libpython3.11-testsuite python3.11-doc 2>&1 \
    | grep -v 'unsandboxed' || true
  for deb in ./*.deb; do dpkg-deb -x "$deb" tree; done
)
code="$work/tree/usr/lib/python3.11"
prose="$work/tree/usr/share/doc/python3.11/html/_sources"
for dir in "$code" "$prose"; do
  if [ ! -d "$dir" ]; then
    echo "lm_corpora: $dir is missing (apt-get download failed?); fix: check 'apt-cache policy python3.11-doc'." >&2
    exit 2
  fi
done
"$python" "$here/scripts/make_tokens.py" --tokenizer bpe --vocab-size "$vocab" --suffix .py \
  --out "$out/code.bin" "$code"
"$python" "$here/scripts/make_tokens.py" --tokenizer bpe --vocab-size "$vocab" --suffix .txt \
  --out "$out/prose.bin" "$prose"
