"""GPT-2's reversible byte <-> printable-character map (byte-level BPE vocabularies)."""

from functools import lru_cache
from typing import Dict


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """The map GPT-2's vocab.json/merges.txt and every byte-level BPE use for raw bytes."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
