"""CLIP's byte-level alphabet, shared by the tests that build tiny CLIP tokenizers offline."""


def bytes_to_unicode() -> list[str]:
    """Every byte as a printable character, in CLIP's (and GPT-2's) order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]
