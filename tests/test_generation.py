"""llava_generation: settings resolved and checked once, and generate()'s MindFormers options (a
generation_config, logits processors, a streamer) on a converted tiny model."""
import numpy as np
import pytest
from mindformers.generation import GenerationConfig

from llava_config import LlavaConfig
from llava_generation import GenerationSettings, penalize_repetition, sample
from test_model import converted_model, hf_greedy, prompt_and_image, random_image, random_prompt


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return converted_model(tmp_path_factory, "small", "hub", 1)


def test_settings_come_from_the_model_config_then_the_generation_config_then_arguments():
    config = LlavaConfig(max_decode_length=77, top_k=5, temperature=0.7)
    settings = GenerationSettings.resolve(config)
    assert (settings.max_length, settings.top_k, settings.temperature, settings.max_new_tokens) == (77, 5, 0.7, None)
    assert settings.eos_token_id == (2,) and settings.pad_token_id == 32001
    # A GenerationConfig is taken whole, its own defaults included (as HF and MindFormers do: max_length 20);
    # a dict overrides only its keys; keyword arguments override both.
    settings = GenerationSettings.resolve(config, GenerationConfig(top_k=9, max_new_tokens=4), top_k=3)
    assert (settings.top_k, settings.max_new_tokens, settings.max_length) == (3, 4, 20)
    settings = GenerationSettings.resolve(config, {"top_k": 9, "max_new_tokens": 4})
    assert (settings.top_k, settings.max_new_tokens, settings.max_length) == (9, 4, 77)
    settings = GenerationSettings.resolve(config, {"eos_token_id": [2, 7]}, temperature=None)
    assert settings.eos_token_id == (2, 7) and settings.temperature == 0.7  # None does not override


@pytest.mark.parametrize("name, value, expected", [
    ("max_new_tokens", -1, "an integer >= 0"), ("max_new_tokens", "abc", "an integer >= 0"),
    ("max_length", 0, "an integer >= 1"), ("temperature", 0, "a number > 0"), ("top_k", -2, "an integer >= 0"),
    ("top_p", 0, r"a number in \(0, 1\]"), ("top_p", 1.5, r"a number in \(0, 1\]"),
    ("repetition_penalty", 0, "a number > 0"), ("do_sample", "yes", "true or false"),
    ("eos_token_id", "x", "a token id"),
])
def test_settings_out_of_range_are_refused_by_name(name, value, expected):
    with pytest.raises(ValueError, match=f"^{name} must be {expected}.*, got {value!r}$"):
        GenerationSettings(**{name: value})


def test_unknown_generate_argument_is_a_type_error():
    with pytest.raises(TypeError, match="max_new_token"):
        GenerationSettings.resolve(LlavaConfig(), max_new_token=3)


def test_new_tokens_fit_the_context():
    settings = GenerationSettings(max_length=100)
    assert settings.new_tokens(30, 1000) == 70  # max_length counts the prompt
    assert GenerationSettings(max_new_tokens=50).new_tokens(30, 60) == 30  # cut at the context
    with pytest.raises(ValueError, match="longer than the context seq_length=30"):
        settings.new_tokens(30, 30)


def test_repetition_penalty_and_sampling_rules():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    assert penalize_repetition(logits.copy(), [0, 1, 1], 2.0).tolist() == [1.0, -2.0, 0.5, 3.0]
    greedy = GenerationSettings()
    assert sample(logits, greedy, None) == 3
    rng = np.random.default_rng(0)
    top1 = GenerationSettings(do_sample=True, top_k=1)
    assert {sample(logits, top1, rng) for _ in range(20)} == {3}
    # top_p: the two best (3.0, 2.0) hold 0.89 of the mass at temperature 1, so 0.85 keeps exactly them.
    nucleus = GenerationSettings(do_sample=True, top_p=0.85)
    assert {sample(logits, nucleus, rng) for _ in range(200)} == {0, 3}


def test_generation_config_and_arguments_drive_generate(pair):
    hf_model, model = pair
    ids, pixels = prompt_and_image(20, hf_model, model)
    out = model.generate([ids], GenerationConfig(max_new_tokens=5), pixel_values=pixels)[0][len(ids):]
    assert out == hf_greedy(hf_model, ids, pixels, 5)
    out = model.generate([ids], {"max_new_tokens": 5}, pixel_values=pixels, max_new_tokens=3)[0][len(ids):]
    assert out == hf_greedy(hf_model, ids, pixels, 3)


def test_streamer_gets_each_step_and_an_end(pair):
    hf_model, model = pair
    rng = np.random.default_rng(21)
    prompts = [random_prompt(rng, model.num_image_features, 3, 4), random_prompt(rng, model.num_image_features, 5, 2)]
    pixels = np.concatenate([random_image(rng, hf_model), random_image(rng, hf_model)])

    class Recorder:
        def __init__(self):
            self.steps, self.ended = [], False

        def put(self, ids):
            self.steps.append(list(ids))

        def end(self):
            self.ended = True

    streamer = Recorder()
    outputs = model.generate(prompts, pixel_values=pixels, max_new_tokens=6, streamer=streamer)
    assert streamer.ended and len(streamer.steps) == 6
    for row, (prompt, output) in enumerate(zip(prompts, outputs)):
        assert [step[row] for step in streamer.steps] == output[len(prompt):]


def test_logits_processor_sees_the_history_and_changes_the_choice(pair):
    hf_model, model = pair
    ids, pixels = prompt_and_image(22, hf_model, model)
    greedy = model.generate([ids], pixel_values=pixels, max_new_tokens=4)[0][len(ids):]
    seen = []

    def ban_the_greedy_first_token(histories, logits):
        seen.append(len(histories[0]))
        logits[:, greedy[0]] = -np.inf
        return logits

    out = model.generate([ids], pixel_values=pixels, max_new_tokens=4,
                         logits_processor=[ban_the_greedy_first_token])[0][len(ids):]
    assert seen == [len(ids) + step for step in range(4)]
    assert out[0] != greedy[0] and greedy[0] not in out
