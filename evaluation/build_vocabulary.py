"""Build mmono's default feature-naming vocabulary (``assets/vocabulary/default.txt``).

The vocabulary is the CLIP tokenizer's whole-word tokens plus the ImageNet class names
that open_clip ships, kept only where they are real English words. The word list that
decides "real" is GCIDE (the Collaborative International Dictionary of English) as
packaged by the ``english-words`` distribution, which this script alone needs::

    pip install english-words
    python -m evaluation.build_vocabulary

The output is committed, so users never run this unless they want another vocabulary.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_WORD = re.compile(r"^[a-z]{3,20}$")


def build_vocabulary() -> list[str]:
    """Return the sorted default vocabulary: real whole words and ImageNet class names."""
    import open_clip
    from english_words import get_english_words_set
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    english = get_english_words_set(["gcide"], lower=True, alpha=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    whole_words = {token[: -len("</w>")] for token in tokenizer.encoder if token.endswith("</w>")}
    words = {word for word in whole_words if _WORD.match(word) and word in english}
    # Class names may be phrases ("golden retriever"); keep those whose every word is real.
    for name in IMAGENET_CLASSNAMES:
        name = name.lower().strip()
        parts = name.replace("-", " ").split()
        if parts and all(part.isalpha() and part in english for part in parts):
            words.add(name)
    return sorted(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/vocabulary/default.txt"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    words = build_vocabulary()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(words) + "\n", encoding="utf-8")
    logger.info("wrote %d words to %s", len(words), args.out)


if __name__ == "__main__":
    main()
