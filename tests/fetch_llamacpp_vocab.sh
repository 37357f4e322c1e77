#!/usr/bin/env bash
# Fetch llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf{,.inp,.out}) into .venv/llamacpp-vocab/.
# They ship in the llama-cpp-python source package, so PyPI is the only network access needed.
# Usage: tests/fetch_llamacpp_vocab.sh [PIP]   (PIP defaults to .venv/bin/pip; run from the repo root)
# Idempotent: returns at once when the files are there. Never fails the caller: on any error it warns and
# exits 0, and tests/test_tokenizer_llamacpp.py then skips.
set -u
PIP="${1:-.venv/bin/pip}"
VERSION=0.3.36
DEST=.venv/llamacpp-vocab
STAMP="$DEST/.llama-cpp-python-$VERSION"

[ -f "$STAMP" ] && exit 0

warn() { echo "warning: fetch_llamacpp_vocab: $*; llama.cpp tokenizer tests will be skipped" >&2; exit 0; }

TMP=$(mktemp -d) || warn "mktemp failed"
trap 'rm -rf "$TMP"' EXIT

"$PIP" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP" \
    || warn "could not download llama-cpp-python==$VERSION (network down?)"
SDIST=$(ls "$TMP"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n 1)
[ -n "$SDIST" ] || warn "no sdist in $TMP"

# Extract only the vocab files; the archive path is llama_cpp_python-X/vendor/llama.cpp/models/FILE.
mkdir -p "$TMP/out" \
    && tar -xzf "$SDIST" -C "$TMP/out" --wildcards --strip-components=4 '*/vendor/llama.cpp/models/ggml-vocab-*' \
    || warn "could not extract $SDIST"

# Swap in atomically-ish: a half-finished run never leaves a stamp behind.
rm -rf "$DEST" && mkdir -p "$(dirname "$DEST")" && mv "$TMP/out" "$DEST" && touch "$STAMP" \
    || warn "could not write $DEST"
echo "fetch_llamacpp_vocab: $(ls "$DEST" | wc -l) files in $DEST"
