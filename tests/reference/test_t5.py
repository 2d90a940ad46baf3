"""The umT5 text encoder and its tokenizer.

Parity: our encoder against transformers' UMT5EncoderModel (test-only reference) with the same
random weights, on padded batches, compared on the real (unmasked) tokens only: HF computes
padding positions too, we zero them. Tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-4 in
float32. Measured here: 3.0e-7 to 5.3e-7 (summation orders of the two attention paths differ).
With bf16 weights (matmuls in bf16) against the float32 reference: 2.5e-2, as large as HF's own
encoder cast to bf16 (2.4e-2; these random weights with order-1 position biases are harsh); the
bound is 1.5x HF's bf16 error.
"""

import json
import pickle
import shutil

import pytest
import torch
from t5_reference import TINY, build_pair, hf_config, randomize, reference_forward, rel_err
from transformers import AutoTokenizer, UMT5EncoderModel

from wan.modules.t5 import OFFICIAL_WEIGHTS_NAME, T5_PRESETS, UMT5Encoder, relative_position_bucket
from wan.modules.tokenizer import DEBUG_TOKENIZER, WanTokenizer, clean_prompt

PARITY_RTOL = 1e-4
CASES = [  # (sequence length, true lengths of the batch rows)
    (40, [40, 7, 23]),  # one row unpadded, the others padded
    (200, [200, 1, 150]),  # distances past max_distance 128; a row with a single token
    (64, [30, 12]),  # every row padded: the tail columns are dropped before the blocks
]


@pytest.fixture(scope="module")
def pair():
    return build_pair(TINY, seed=3)


def make_batch(length: int, lengths: list[int], vocab: int = TINY["vocab"], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), length), generator=gen)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0  # pad id, as the tokenizer writes it
    return ids, mask


@pytest.mark.parametrize("length,lengths", CASES)
def test_matches_transformers(pair, length, lengths):
    ref, ours = pair
    ids, mask = make_batch(length, lengths)
    with torch.no_grad():
        out = ours(ids, mask)
        expected = reference_forward(ref, ids, mask)
    real = mask.bool()
    assert out.shape == (len(lengths), length, TINY["dim"]) and out.dtype == torch.float32
    assert rel_err(out[real], expected[real]) <= PARITY_RTOL
    assert torch.count_nonzero(out[~real]) == 0
    # Each row alone gives what it gives in the batch: padding of other rows does not leak in.
    with torch.no_grad():
        alone = ours(ids[1:2, : lengths[1]], mask[1:2, : lengths[1]])
    assert rel_err(alone[0], out[1, : lengths[1]]) <= PARITY_RTOL


def test_mask_none_means_no_padding(pair):
    ref, ours = pair
    ids, mask = make_batch(50, [50, 50])
    with torch.no_grad():
        assert torch.equal(ours(ids), ours(ids, mask))
        assert rel_err(ours(ids), reference_forward(ref, ids, mask)) <= PARITY_RTOL


def test_relative_position_buckets_match_transformers(pair):
    ref, _ = pair
    rel = torch.arange(-600, 601)[None, :]
    expected = ref.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(rel)
    assert torch.equal(relative_position_bucket(rel, 32, 128), expected)
    # The bidirectional layout: 0..15 for keys at or before the query, 16..31 for keys after it.
    assert relative_position_bucket(torch.tensor([0, -1, 1, -127, -128, 10**6]), 32, 128).tolist() == [
        0, 1, 17, 15, 15, 31,
    ]  # fmt: skip


def test_bf16_weights_run_in_bf16_and_return_float32(pair):
    """bf16 weights: as close to the float32 reference as HF's own encoder cast to bf16 is."""
    ref, ours = pair
    bf16 = UMT5Encoder(**ours.config)
    bf16.load_state_dict(ours.state_dict())
    bf16.to(torch.bfloat16)
    ref_bf16 = UMT5EncoderModel(ref.config).eval()
    ref_bf16.load_state_dict(ref.state_dict())
    ref_bf16.to(torch.bfloat16)
    ids, mask = make_batch(40, [40, 9])
    with torch.no_grad():
        out = bf16(ids, mask)
        expected = reference_forward(ref, ids, mask)
        ref_bf16_out = reference_forward(ref_bf16, ids, mask).float()
    real = mask.bool()
    assert out.dtype == torch.float32
    ours_err, hf_err = rel_err(out[real], expected[real]), rel_err(ref_bf16_out[real], expected[real])
    assert ours_err < 5e-2 and ours_err < 1.5 * hf_err
    assert torch.count_nonzero(out[~real]) == 0


def test_refuses_bad_inputs(pair):
    _, ours = pair
    ids, mask = make_batch(10, [10])
    with pytest.raises(ValueError, match="token ids"):
        ours(ids + TINY["vocab"], mask)
    with pytest.raises(ValueError, match="mask shape"):
        ours(ids, mask[:, :5])
    with pytest.raises(ValueError, match=r"ids must be \[B, L\]"):
        ours(ids[0], mask[0])
    with pytest.raises(ValueError, match="num_heads"):
        UMT5Encoder(**dict(TINY, num_heads=5))


def test_all_padding_gives_zeros(pair):
    _, ours = pair
    ids, mask = make_batch(12, [0, 0])
    with torch.no_grad():
        out = ours(ids, mask)
    assert out.shape == (2, 12, TINY["dim"]) and torch.count_nonzero(out) == 0


# ----------------------------------------------------------------------------------------------
# Weight files


def test_official_layout_keys_match_the_release(pair):
    """The key set of the release file, at umt5-xxl sizes (built on meta: nothing allocated)."""
    with torch.device("meta"):
        model = UMT5Encoder(**T5_PRESETS["umt5-xxl"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    per_block = {
        "norm1.weight": [4096], "attn.q.weight": [4096, 4096], "attn.k.weight": [4096, 4096],
        "attn.v.weight": [4096, 4096], "attn.o.weight": [4096, 4096], "pos_embedding.embedding.weight": [32, 64],
        "norm2.weight": [4096], "ffn.gate.0.weight": [10240, 4096], "ffn.fc1.weight": [10240, 4096],
        "ffn.fc2.weight": [4096, 10240],
    }  # fmt: skip
    expected = {"token_embedding.weight": [256384, 4096], "norm.weight": [4096]}
    expected |= {f"blocks.{i}.{k}": v for i in range(24) for k, v in per_block.items()}
    assert shapes == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_official_pth_loads_strictly(pair, tmp_path, dtype):
    _, ours = pair
    path = tmp_path / OFFICIAL_WEIGHTS_NAME
    torch.save({k: v.to(dtype) for k, v in ours.state_dict().items()}, path)
    loaded = UMT5Encoder.from_pretrained(path)  # dtype=None keeps the file's dtype
    assert loaded.config == ours.config  # sizes read from the tensor shapes
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for name, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(dtype)), name
    # A Wan release folder (the .pth beside other files) loads too, and dtype= casts.
    as_fp32 = UMT5Encoder.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    ids, mask = make_batch(30, [30, 11])
    with torch.no_grad():
        out = as_fp32(ids, mask)
        expected = ours(ids, mask)
    if dtype == torch.float32:
        assert torch.equal(out, expected)
    else:
        assert rel_err(out, expected) < 2e-2


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_hf_folder_loads_and_matches(pair, tmp_path, max_shard_size):
    ref, _ = pair
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    ref.save_pretrained(tmp_path, **kwargs)
    if max_shard_size is not None:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = UMT5Encoder.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config == UMT5Encoder(**TINY).config
    ids, mask = make_batch(60, [60, 17, 5])
    with torch.no_grad():
        out = loaded(ids, mask)
        expected = reference_forward(ref, ids, mask)
    real = mask.bool()
    assert rel_err(out[real], expected[real]) <= PARITY_RTOL


def test_full_umt5_folder_loads_encoder_only(tmp_path):
    """A UMT5EncoderModel key set plus decoder/lm_head tensors: those are skipped."""
    from transformers import UMT5ForConditionalGeneration

    cfg = dict(TINY, num_layers=1)
    full = UMT5ForConditionalGeneration(hf_config(cfg)).eval()
    randomize(full, 5)
    full.save_pretrained(tmp_path)
    loaded = UMT5Encoder.from_pretrained(tmp_path, dtype=torch.float32)
    ids, mask = make_batch(20, [20, 8])
    with torch.no_grad():
        out = loaded(ids, mask)
        expected = full.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_err(out[mask.bool()], expected[mask.bool()]) <= PARITY_RTOL


def save_official(model: UMT5Encoder, path, edit=None):
    state = dict(model.state_dict())
    if edit:
        edit(state)
    torch.save(state, path)
    return path


def test_bad_official_files_are_refused(pair, tmp_path):
    _, ours = pair
    good = save_official(ours, tmp_path / "good.pth")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth: not a readable torch state dict"):
        UMT5Encoder.from_pretrained(truncated)

    def rename(state):
        state["blocks.1.attn.query.weight"] = state.pop("blocks.1.attn.q.weight")

    with pytest.raises(
        ValueError, match=r"(?s)unexpected key 'blocks.1.attn.query.weight'.*missing.*blocks.1.attn.q.weight"
    ):
        UMT5Encoder.from_pretrained(save_official(ours, tmp_path / "wrong_key.pth", rename))

    def reshape(state):
        state["blocks.0.ffn.fc2.weight"] = state["blocks.0.ffn.fc2.weight"].t().contiguous()

    with pytest.raises(ValueError, match=r"wrong_shape.pth: key 'blocks.0.ffn.fc2.weight' has shape \[80, 48\]"):
        UMT5Encoder.from_pretrained(save_official(ours, tmp_path / "wrong_shape.pth", reshape))

    def drop_layer(state):
        for key in [k for k in state if k.startswith("blocks.1.")]:
            del state[key]

    with pytest.raises(ValueError, match=r"missing from no_layer.pth: blocks.1.norm1.weight"):
        UMT5Encoder.from_pretrained(save_official(ours, tmp_path / "no_layer.pth", drop_layer))

    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(ValueError, match="list.pth: holds a list, not a state dict"):
        UMT5Encoder.from_pretrained(not_a_dict)

    # A pickle of an arbitrary object: weights_only loading refuses to run it.
    evil = tmp_path / "object.pth"
    evil.write_bytes(pickle.dumps(shutil.Error("x")))
    with pytest.raises(ValueError, match="object.pth: not a readable torch state dict"):
        UMT5Encoder.from_pretrained(evil)

    with pytest.raises(ValueError, match="no such file or folder"):
        UMT5Encoder.from_pretrained(tmp_path / "absent.pth")


def test_bad_hf_folders_are_refused(pair, tmp_path):
    ref, _ = pair
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="t5")))
    with pytest.raises(ValueError, match="config.json: not a umT5 encoder config: model_type 't5'"):
        UMT5Encoder.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(dict(config, d_ff=96)))
    with pytest.raises(ValueError, match=r"model.safetensors: key '.*wi_0.weight' has shape \[80, 48\]"):
        UMT5Encoder.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="model.safetensors: key .* is truncated or corrupt"):
        UMT5Encoder.from_pretrained(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        UMT5Encoder.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# Tokenizer

PROMPTS = [
    "A golden retriever runs across a green meadow at sunset, cinematic lighting.",
    "Two children splash in the water on a sunny beach; the camera slowly zooms in.",
    "A zebra gallops past giraffes in the savanna",  # words outside the tokenizer's corpus
]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    """The debug model as a sentencepiece-only folder (spiece.model + tokenizer_config.json) and as
    the folder AutoTokenizer writes from it (tokenizer.json, like the google/umt5-xxl folder)."""
    spm_folder = tmp_path_factory.mktemp("spm_folder")
    shutil.copy(DEBUG_TOKENIZER, spm_folder / "spiece.model")
    (spm_folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    json_folder = tmp_path_factory.mktemp("json_folder")
    AutoTokenizer.from_pretrained(str(spm_folder)).save_pretrained(str(json_folder))
    assert (json_folder / "tokenizer.json").is_file()
    return spm_folder, json_folder


def test_debug_tokenizer_matches_the_debug_encoder():
    from wan.configs import dit_preset

    tok = WanTokenizer.debug()
    assert tok.vocab_size == T5_PRESETS["debug"]["vocab"]
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)  # umT5's special ids
    assert T5_PRESETS["debug"]["dim"] == dit_preset("debug")["text_dim"]
    encoder = UMT5Encoder(**T5_PRESETS["debug"]).eval()
    ids, mask = tok(PROMPTS)
    with torch.no_grad():
        out = encoder(ids, mask)
    assert out.shape == (3, 512, T5_PRESETS["debug"]["dim"])
    assert torch.count_nonzero(out[~mask.bool()]) == 0


def test_real_words_are_not_unknown():
    tok = WanTokenizer.debug()
    for prompt in PROMPTS:
        tokens = tok.tokenize([prompt])[0]
        assert tok.unk_id not in tokens, prompt
        assert len(tokens) < len(prompt) // 2  # whole words and word pieces, not characters
        assert tok.decode(tokens) == prompt


@pytest.mark.parametrize("source", ["model_file", "spm_folder", "json_folder"])
def test_eos_padding_and_truncation(tokenizer_folders, source):
    path = {"model_file": DEBUG_TOKENIZER, "spm_folder": tokenizer_folders[0], "json_folder": tokenizer_folders[1]}
    tok = WanTokenizer(path[source], max_length=24)
    long_prompt = " ".join(PROMPTS)
    ids, mask = tok([PROMPTS[0], "a cat", long_prompt])
    assert ids.shape == mask.shape == (3, 24) and ids.dtype == mask.dtype == torch.long
    n = len(tok.tokenize(["a cat"])[0])
    assert ids[1, :n].tolist() == tok.tokenize(["a cat"])[0]
    assert ids[1, n] == tok.eos_id and mask[1].tolist() == [1] * (n + 1) + [0] * (23 - n)
    assert torch.all(ids[1, n + 1 :] == tok.pad_id)
    # Too long: cut to max_length - 1 tokens, then EOS, as the reference (HF truncation) does.
    assert mask[2].all() and ids[2, -1] == tok.eos_id
    assert ids[2, :23].tolist() == tok.tokenize([long_prompt])[0][:23]
    ids1, mask1 = tok(PROMPTS[0])  # one string is a batch of one
    assert torch.equal(ids1, ids[:1]) and torch.equal(mask1, mask[:1])


def test_sources_agree_and_match_the_reference_call(tokenizer_folders):
    """The bare .model, both folders, and the reference's own AutoTokenizer call (padding to
    max_length, truncation, special tokens) give the same ids and mask."""
    texts = [clean_prompt(p) for p in PROMPTS] + [" ".join(PROMPTS * 3)]
    results = [WanTokenizer(p, max_length=40)(texts) for p in (DEBUG_TOKENIZER, *tokenizer_folders)]
    for ids, mask in results[1:]:
        assert torch.equal(ids, results[0][0]) and torch.equal(mask, results[0][1])
    hf = AutoTokenizer.from_pretrained(str(tokenizer_folders[1]))
    expected = hf(texts, padding="max_length", truncation=True, max_length=40, return_tensors="pt")
    assert torch.equal(results[0][0], expected.input_ids)
    assert torch.equal(results[0][1], expected.attention_mask)


def test_release_folder_layout(tokenizer_folders, tmp_path):
    """A Wan release folder keeps the tokenizer in google/umt5-xxl/."""
    shutil.copytree(tokenizer_folders[1], tmp_path / "google" / "umt5-xxl")
    tok = WanTokenizer(tmp_path, max_length=16)
    assert torch.equal(tok(PROMPTS)[0], WanTokenizer(DEBUG_TOKENIZER, max_length=16)(PROMPTS)[0])


def test_cleaning():
    assert clean_prompt("  Tom &amp;amp; Jerry\n\n run \t fast  ") == "Tom & Jerry run fast"
    assert clean_prompt("&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot;") == '<b>bold</b> "quoted"'
    assert clean_prompt("CafÃ© naÃ¯ve, “curly” quotes\u00a0here") == 'Café naïve, "curly" quotes here'
    assert clean_prompt("\x1b[31mred\x1b[0m text\x07") == "red text"
    assert clean_prompt("Ångström façade") == "Ångström façade"  # correct text is left alone
    tok = WanTokenizer.debug(max_length=32)
    assert torch.equal(tok("  a  cat &amp;amp;\n dog ")[0], tok("a cat & dog")[0])
    raw = WanTokenizer(DEBUG_TOKENIZER, max_length=32, clean=False)
    assert not torch.equal(raw("a cat &amp; dog")[0], raw("a cat & dog")[0])


def test_bad_tokenizers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        WanTokenizer(tmp_path / "absent.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        WanTokenizer(junk)
    # The transformers 5.x trap: T5TokenizerFast(vocab_file=...) ignores the file and yields a
    # vocabulary of special tokens only; a folder saved from it is refused, not used.
    from transformers import T5TokenizerFast

    T5TokenizerFast(vocab_file=str(DEBUG_TOKENIZER), extra_ids=0).save_pretrained(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="maps plain English .* to unknown ids"):
        WanTokenizer(tmp_path / "empty")


def test_hf_reference_model_is_told_the_mask(pair):
    """Guard for the parity test itself: without the mask HF lets padding in and differs."""
    ref, ours = pair
    ids, mask = make_batch(40, [40, 7])
    with torch.no_grad():
        unmasked = ref(input_ids=ids).last_hidden_state
        out = ours(ids, mask)
    assert rel_err(out[1, :7], unmasked[1, :7]) > 1e-2
    assert isinstance(ref, UMT5EncoderModel)
