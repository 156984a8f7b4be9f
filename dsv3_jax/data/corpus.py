"""The embedded default corpus: text that ships with every CPython, so a run needs no download.

English prose from `pydoc_data.topics` (the language reference's help topics) plus the
standard library's top-level Python sources, one document per topic or file, in a fixed order.
"""

from __future__ import annotations

import pathlib
import sysconfig


def embedded_documents(max_source_bytes: int = 3_000_000) -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    budget = max_source_bytes
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > budget:
            break
        docs.append(text)
        budget -= len(text)
    return docs
