"""`--contact-sheet out.png`: the top images of a query in a grid, each with its caption (or id), rank and score;
an image query is shown first, framed. Image collections only (matplotlib, Agg)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

COLUMNS = 5


def write(path: str, hits: Sequence[Any], index: Any, *, query: str, query_image: Any = None) -> str:
    """Draws the hits' images (`index.modality` must be "image") into `path`; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmjax.data.raw_inputs import decode_image, read_cell
    from mmjax.search.index_store import IndexError_
    from mmjax.search.query import caption_of

    if index.modality != "image":
        raise IndexError_(f"--contact-sheet draws image collections; this index holds {index.modality} items "
                          "(use the table or --json)")
    panels: list[tuple[np.ndarray, str, bool]] = []
    if query_image is not None:
        panels.append((decode_image(query_image), "query", True))
    meta = index.meta
    for hit in hits:
        try:
            image = decode_image(read_cell("image", hit.item["image"], meta["root"]))
        except ValueError as error:  # The file moved since indexing: say so in its panel.
            image, note = np.full((8, 8, 3), 96, np.uint8), f" [{error}]"
        else:
            note = ""
        score = f"{hit.score:.3f}" + (f", ITM {hit.itm_logit:.2f}" if hit.itm_logit is not None else "")
        caption = textwrap.shorten(caption_of(hit.item, index) + note, 60, placeholder="...")
        panels.append((image, f"#{hit.rank} ({score})\n" + "\n".join(textwrap.wrap(caption, 24)[:3]), False))
    columns = min(COLUMNS, max(1, len(panels)))
    rows = math.ceil(len(panels) / columns) if panels else 1
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.9 * rows + 0.6), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (image, label, framed) in zip(axes.flat, panels):
        axis.imshow(image, interpolation="nearest")
        axis.set_title(label, fontsize=8)
        if framed:
            axis.axis("on")
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(3)
    figure.suptitle(textwrap.shorten(query, 110, placeholder="..."), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
