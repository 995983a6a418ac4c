"""labkit.shapes.tokenizer: a CLIP-format tokenizer with one token per prompt word."""

from labkit.shapes import data
from labkit.shapes.tokenizer import fit_tokenizer, load_tokenizer, prompt_words


def test_tokenizer_round_trip(tmp_path):
    tokenizer = fit_tokenizer(tmp_path / "tok")
    assert tokenizer.model_max_length == 77
    assert (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "merges.txt").exists()
    for word in prompt_words():
        assert len(tokenizer.tokenize(word)) == 1, word
    for prompt in data.all_prompts():
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(prompt.split()) + 2
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    padded = tokenizer(["a small red circle at the top left", ""], padding="max_length", max_length=77)
    assert all(len(ids) == 77 for ids in padded.input_ids)
    # reloading the folder gives the same tokenizer
    assert load_tokenizer(tmp_path / "tok")(prompt).input_ids == tokenizer(prompt).input_ids
