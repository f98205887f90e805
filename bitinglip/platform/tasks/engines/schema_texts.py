"""One JSON text per distinct JSON schema, so an engine compiles each
schema's grammar once.

vLLM hands a ``json_schema`` response format to xgrammar as text, and
xgrammar's compiler caches grammars by that text: the same schema written
with its keys in another order (as rows of a batch file from different
writers are) would compile again, and a grammar takes up to about 30 s of
CPU for a 44 kB schema.  So a schema is looked up by the hash of its
canonical JSON (sorted keys, no spaces) and sent as the text of its first
writer; JSON objects are unordered, so the grammar is the same.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from bitinglip.platform.tasks.generation import schema_key

#: distinct schemas kept per engine; beyond it the least recently used goes (xgrammar's own cache is bounded
#: by bytes, VLLM_XGRAMMAR_CACHE_MB)
MAX_SCHEMAS = 1024


class SchemaTexts:
    """Canonical hash -> the JSON text an engine sends for it."""

    def __init__(self, limit: int = MAX_SCHEMAS) -> None:
        self.limit = limit
        self._texts: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # partitions on several worker threads build requests at once

    def text(self, schema: Mapping[str, Any]) -> str:
        key = schema_key(schema)
        with self._lock:
            found = self._texts.get(key)
            if found is None:
                found = self._texts[key] = json.dumps(schema)
                if len(self._texts) > self.limit:
                    self._texts.popitem(last=False)
            else:
                self._texts.move_to_end(key)
            return found

    def __len__(self) -> int:
        return len(self._texts)
