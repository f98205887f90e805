"""Tiny random-weight models built on the spot, with tokenizers trained
locally: tests never reach a model hub."""

from __future__ import annotations

from pathlib import Path

from bitinglip.platform.jobs.sample import sample_corpus


def _train_wordpiece(path: Path) -> object:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(sample_corpus(2000, seed=7), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    fast.save_pretrained(path)
    return fast


def _tiny_bert(path: Path, model_class: str, seed: int, **config: object) -> Path:
    """A 2-layer BERT of ``model_class`` with a tokenizer trained here."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = _train_wordpiece(path)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, **config)
    getattr(transformers, model_class)(cfg).eval().save_pretrained(path)
    return path


def make_tiny_classifier(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier with three labels."""
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    return _tiny_bert(path, "BertForSequenceClassification", seed, num_labels=3, id2label=labels,
                      label2id={v: k for k, v in labels.items()})


def make_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (mean pooling: no sentence-transformers config)."""
    return _tiny_bert(path, "BertModel", seed)


def make_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_corpus(2000, seed=11), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=128)
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(fast), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


#: renders a chat as the tiny Llama's prompt; the assistant turn is left open for generation
TINY_LLAMA_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def make_tiny_llama(path: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A 2-layer Llama (head size 64, which vLLM's CPU attention accepts; it
    refuses 16) with a byte-level BPE tokenizer of about 512 tokens trained
    here, and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_corpus(2000, seed=13), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="</s>", model_max_length=512)
    fast.chat_template = TINY_LLAMA_CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    # initializer_range: Llama's 0.02 gives nearly flat logits (greedy text repeats one token); 0.1 gives varied
    # greedy text, for tests of stop strings and of argmax parity between engines
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, initializer_range=initializer_range)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path
