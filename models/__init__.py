"""Model architectures, their forward passes, tokenizers and converters.

CONVERTER_REVISION is bumped when the converter (models/convert) starts writing something that files
it wrote before lack; `edge fetch` re-converts cached default models of an older revision.  It lives
here, not in models.convert, so that checking a cached file does not import the converter (numpy).
2: byte-level BPE tokenizer tables.
3: int8 group scales rounded up to a half (no value clips), not to nearest.
"""

import core  # noqa: F401  (picks the kernel build before models._llama_native loads)

CONVERTER_REVISION = 3
