"""LlavaTokenizer against HuggingFace's slow LlamaTokenizer configured as llava-hf/llava-1.5-7b-hf.

The HF reference is loaded with `from_pretrained` from a directory holding the reference
`tokenizer.model` and a `tokenizer_config.json` with llava-hf's settings (legacy=False, bos on, eos off,
`<image>` = 32000 and `<pad>` = 32001 as special added tokens, pad_token `<pad>`), so it goes through
the same code path as the hub tokenizer. Ids must be identical; decoded text too.
"""
import json
import os
import random
import shutil

import numpy as np
import pytest

# The plugin (MindSpore) must be imported before transformers touches protobuf.
from conftest import REFERENCE_DIR
from llava_tokenizer import LlavaTokenizer, check_vocab_fits
from mindformers.models.build_tokenizer import build_tokenizer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

import transformers

VOCAB = os.path.join(REFERENCE_DIR, "llama2_tokenizer.model")

IMAGE_ID, PAD_ID, BOS_ID, EOS_ID = 32000, 32001, 1, 2
ONE_TURN = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
# Pinned independently of HF: BOS, "USER:", the lone "▁" (29871) before <image>, no "▁" after it.
ONE_TURN_IDS = [1, 3148, 1001, 29901, 29871, 32000, 13, 5618, 338, 4318, 297, 445, 1967, 29973, 319, 1799,
                9047, 13566, 29901]

PROMPTS = [
    ONE_TURN,
    "USER: " + "<image>" * 576 + "\nWhat is shown in this image? ASSISTANT:",
    "USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:",
    "USER: <image>\nWhat's in it? ASSISTANT: A red car.</s>USER: And the colour of the sky? ASSISTANT:",
    "USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:",
    "USER: Tell me a joke. ASSISTANT:",
    "Describe the image in English:",
    "USER: <image>\n这张图片里有什么？请用中文回答。 ASSISTANT:",
    "Ünïcödé façade — naïve café, Привет мир, こんにちは 🤖👍",
    "   three leading spaces",
    " one leading space and trailing ",
    "digits 0123456789 3.14159 1,000,000 and 2024-05-01",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tand  double  spaces",
    "<image>\nPrompt that starts with the image tag",
    "<image>",
    "text<image>glued<image>",
    "literal ▁ lower one eighth block and <pad> and </s> inside",
    "<imag> almost a tag, <IMAGE> upper case, < image >",
    "",
]


def llava_hf_tokenizer(directory):
    """HF slow LlamaTokenizer as llava-hf/llava-1.5-7b-hf configures it, loaded from `directory`."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(VOCAB, os.path.join(directory, "tokenizer.model"))

    def special(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False, "padding_side": "left", "sp_model_kwargs": {},
        "added_tokens_decoder": {"0": special("<unk>"), "1": special("<s>"), "2": special("</s>"),
                                 "32000": special("<image>"), "32001": special("<pad>")},
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return transformers.LlamaTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def ours():
    return LlavaTokenizer(VOCAB)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return llava_hf_tokenizer(str(tmp_path_factory.mktemp("hf_tokenizer")))


def test_special_token_ids(ours, hf):
    assert (ours.image_token_id, ours.pad_token_id, ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == \
        (IMAGE_ID, PAD_ID, BOS_ID, EOS_ID, 0)
    assert hf.convert_tokens_to_ids("<image>") == IMAGE_ID and hf.pad_token_id == PAD_ID
    assert ours.vocab_size == 32000
    assert len(ours) == len(hf) == 32002
    assert ours.convert_ids_to_tokens([IMAGE_ID, PAD_ID]) == ["<image>", "<pad>"]


def test_reference_tokenizations(ours):
    # From the reference README, measured on the same tokenizer.model.
    assert ours.encode("USER:", add_special_tokens=False) == [3148, 1001, 29901]
    assert ours.encode("Describe the image in English:", add_special_tokens=False) == \
        [20355, 915, 278, 1967, 297, 4223, 29901]
    assert ours(ONE_TURN)["input_ids"] == ONE_TURN_IDS


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_match_hf(ours, hf, prompt):
    expected = hf(prompt)["input_ids"]
    assert ours(prompt)["input_ids"] == expected
    assert ours.encode(prompt) == expected
    assert ours.encode(prompt, add_special_tokens=False) == hf.encode(prompt, add_special_tokens=False)


def test_576_image_tokens_in_a_row(ours):
    ids = ours("USER: " + "<image>" * 576 + "\nWhat is shown in this image? ASSISTANT:")["input_ids"]
    first = ids.index(IMAGE_ID)
    assert ids[:first] == [1, 3148, 1001, 29901, 29871]
    assert ids[first:first + 576] == [IMAGE_ID] * 576
    assert ids[first + 576] == 13 and ids.count(IMAGE_ID) == 576


def test_legacy_false_is_what_makes_the_ids_match(ours):
    """Plain SentencePiece (legacy=True) puts a "▁" (29871) in front of the text after `<image>`."""
    legacy = LlavaTokenizer(VOCAB, legacy=True)
    legacy_ids = legacy(ONE_TURN)["input_ids"]
    after_image = legacy_ids[legacy_ids.index(IMAGE_ID) + 1:]
    assert after_image[:2] == [29871, 13]
    assert ours(ONE_TURN)["input_ids"][6] == 13


def test_random_compositions_match_hf(ours, hf):
    rng = random.Random(1234)
    atoms = ["USER:", " ASSISTANT:", " ", "  ", "\n", "<image>", "<pad>", "<s>", "</s>", "<unk>", "hello",
             "World", "你好", "ñ", "🤖", "42", "3.14", "\t", "▁", "don't", ",", "!", "<", "image", ">", "é"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        assert ours(text)["input_ids"] == hf(text)["input_ids"], repr(text)
        ids = [rng.randrange(32002) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.5:  # a leading special token changes the spacing rules
            ids.insert(0, rng.choice([0, BOS_ID, EOS_ID, IMAGE_ID, PAD_ID]))
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_decode_generated_ids_matches_hf(ours, hf):
    answers = ["The image shows a red car parked next to a tree.", "这是一只猫。", " 42", "Line 1\nLine 2",
               "Emoji 🤖 and café"]
    # After "ASSISTANT:" a model emits "▁The ..." pieces; encoding the bare answer gives the same pieces.
    generated = [hf.encode(answer, add_special_tokens=False) + [EOS_ID] for answer in answers]
    generated.append([PAD_ID, PAD_ID] + generated[0])  # left padding, as a batch would have
    generated.append([BOS_ID] + generated[1] + [PAD_ID] * 3)
    for ids in generated:
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(np.array(ids), skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(generated[0], skip_special_tokens=True) == "The image shows a red car parked next to a tree."
    assert ours.batch_decode(generated, skip_special_tokens=True) == hf.batch_decode(generated,
                                                                                      skip_special_tokens=True)


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_decode_of_prompts_matches_hf(ours, hf, prompt):
    ids = hf(prompt)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_after_a_leading_special_token(ours, hf):
    # "<s>" then "1" (29896, no "▁"): HF puts a space between them; "▁Hi" (6324) brings its own.
    for ids in ([BOS_ID, 29896, 29906], [BOS_ID, 6324], [PAD_ID, 29896], [BOS_ID, IMAGE_ID, 29896]):
        assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode([BOS_ID, 29896, 29906]) == "<s> 12"


def test_bos_and_eos_switches(ours):
    no_bos = LlavaTokenizer(VOCAB, add_bos_token=False)
    with_eos = LlavaTokenizer(VOCAB, add_eos_token=True)
    body = ours.encode("USER: hi ASSISTANT:", add_special_tokens=False)
    assert ours.encode("USER: hi ASSISTANT:") == [BOS_ID] + body
    assert no_bos.encode("USER: hi ASSISTANT:") == body
    assert with_eos.encode("USER: hi ASSISTANT:") == [BOS_ID] + body + [EOS_ID]


def test_pad_token_already_in_the_vocabulary_keeps_its_id():
    tokenizer = LlavaTokenizer(VOCAB, pad_token="<unk>")  # MindFormers' LLaMA default
    assert (tokenizer.pad_token_id, tokenizer.image_token_id, len(tokenizer)) == (0, IMAGE_ID, 32001)


def test_built_from_upstream_yaml_keys():
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "LlavaTokenizer") is LlavaTokenizer
    tokenizer = build_tokenizer({"type": "LlavaTokenizer", "vocab_file": VOCAB, "add_bos_token": True,
                                 "add_eos_token": False})
    assert isinstance(tokenizer, LlavaTokenizer)
    assert tokenizer(ONE_TURN)["input_ids"] == ONE_TURN_IDS


@pytest.mark.parametrize("save_json", [True, False], ids=["json", "yaml"])
def test_save_pretrained_round_trip(tmp_path, save_json):
    tokenizer = LlavaTokenizer(VOCAB, add_eos_token=True)
    tokenizer.save_pretrained(str(tmp_path), save_json=save_json)
    assert (tmp_path / "tokenizer.model").read_bytes() == open(VOCAB, "rb").read()
    loaded = LlavaTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(loaded, LlavaTokenizer)
    assert loaded(ONE_TURN)["input_ids"] == ONE_TURN_IDS + [EOS_ID]
    assert (loaded.image_token_id, loaded.pad_token_id, len(loaded)) == (IMAGE_ID, PAD_ID, 32002)


# ----------------------------------------------------------------------------------------------- bad vocabularies

def test_missing_vocab_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LlavaTokenizer(str(missing))
    for unset in (None, ""):  # the YAML left it out and no checkpoint folder gave one
        with pytest.raises(ValueError, match="no vocab_file: set processor.tokenizer.vocab_file"):
            LlavaTokenizer(unset)


@pytest.mark.parametrize("content", [b"this is a plain text vocabulary\nhello 1\n",
                                     b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, b""],
                         ids=["text", "png", "empty"])
def test_non_sentencepiece_file_names_the_path(tmp_path, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="not a SentencePiece model") as info:
        LlavaTokenizer(str(bad))
    assert str(bad) in str(info.value)


def test_check_vocab_fits(ours):
    check_vocab_fits(ours, vocab_size=32064, image_token_id=IMAGE_ID)  # llava-1.5-7b-hf
    check_vocab_fits(ours, vocab_size=32002, image_token_id=IMAGE_ID)  # exactly enough rows
    with pytest.raises(ValueError, match="32002") as info:
        check_vocab_fits(ours, vocab_size=32000, image_token_id=IMAGE_ID)  # LLaMA-2's own vocab_size
    assert "32000" in str(info.value)
    with pytest.raises(ValueError, match="image token id is 32000") as info:
        check_vocab_fits(ours, vocab_size=32064, image_token_id=32001)
    assert "32001" in str(info.value)
