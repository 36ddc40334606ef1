"""The mix-and-match VLM, in layers:

* `tinyvlm.vlm.config`: `VLMConfig` and its records (torch-free);
* `tinyvlm.vlm.model`: the `VLM` module (forward, generation) and how parts are fitted together;
* `tinyvlm.vlm.files`: atomic saving, ``push_to_hub``, the model card;
* `tinyvlm.vlm.recipes`: tinyvlm's own layout family and the recipe zoo entries.

The doors that make VLMs from names (`tinyvlm.build_vlm`, `tinyvlm.load_vlm`) are in `tinyvlm.api`, above this
package. Importing this package imports none of its modules; the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyvlm.lazy import lazy_attributes

_LAZY = {
    "VLM": "tinyvlm.vlm.model",
    "VLMOutput": "tinyvlm.vlm.model",
    "VLMConfig": "tinyvlm.vlm.config",
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)


if TYPE_CHECKING:
    from tinyvlm.vlm.config import VLMConfig
    from tinyvlm.vlm.model import VLM, VLMOutput
