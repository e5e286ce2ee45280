"""Captions: ClipCap's decoding reproduced token for token, GPT-2 and tokenizer loading from
every source (offline errors included), and `cd2p caption` from each cloud format and from
pairs with its contact sheet.

The GPT-2s are tiny random `GPT2LMHeadModel`s saved in the real formats (a `transformers`
directory, ClipCap's pickled checkpoint); the tokenizer is GPT-2's own file format (vocab.json
+ merges.txt) trained here with `tokenizers` and loaded through `--tokenizer PATH`, as users
do offline. The stop token's embedding (tied to the output layer) is scaled up so that some
captions stop at "." and others run to ClipCap's 67-token limit.
"""

from __future__ import annotations

import html
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from click.testing import CliRunner
from PIL import Image
from torch import nn

from cd2p.cli import main
from cd2p.data.scannet_files import write_mesh_ply
from cd2p.language.captioning import (
    Captioner,
    beam_tokens,
    greedy_tokens,
    load_gpt2,
    load_tokenizer,
    spread_indices,
    stop_token_id,
)
from cd2p.language.contact_sheet import printable
from cd2p.models.student import Cd2pStudent
from cd2p.models.teacher import TeacherWeightsError

CORPUS = [
    "a chair next to a wooden table.", "a red sofa in a living room.",
    "a bed with two white pillows.", "a kitchen with a sink and a window.",
    "an office desk with a monitor.", "a bathroom with a toilet and a bathtub.",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """GPT-2's tokenizer files (byte-level BPE: vocab.json + merges.txt), trained here."""
    from tokenizers import ByteLevelBPETokenizer

    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 10, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    bpe.save_model(str(out))
    return out


def tiny_gpt2(vocab: int, width: int, seed: int, stop: int, **config) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=96, n_embd=width, bos_token_id=0,
                     eos_token_id=0, initializer_range=0.1, **config)  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.wte.weight[stop] *= 3.0  # tied to lm_head: "." becomes likelier
    return model


# -- ClipCap's predict.py, step by step (github.com/rmokady/CLIP_prefix_caption) --------------
# generate2 and generate_beam as published, with `model.gpt` the GPT-2; only the returned values
# are extended (the token ids) so that they can be compared token for token.


class ClipCapModel(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt


def reference_generate_beam(model, tokenizer, beam_size=5, prompt=None, embed=None,
                            entry_length=67, temperature=1.0, stop_token="."):  # fmt: skip
    model.eval()
    stop_token_index = tokenizer.encode(stop_token)[0]
    tokens = None
    scores = None
    device = next(model.parameters()).device
    seq_lengths = torch.ones(beam_size, device=device)
    is_stopped = torch.zeros(beam_size, device=device, dtype=torch.bool)
    with torch.no_grad():
        if embed is not None:
            generated = embed
        for _ in range(entry_length):
            outputs = model.gpt(inputs_embeds=generated)
            logits = outputs.logits
            logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
            logits = logits.softmax(-1).log()
            if scores is None:
                scores, next_tokens = logits.topk(beam_size, -1)
                generated = generated.expand(beam_size, *generated.shape[1:])
                next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
                if tokens is None:
                    tokens = next_tokens
                else:
                    tokens = tokens.expand(beam_size, *tokens.shape[1:])
                    tokens = torch.cat((tokens, next_tokens), dim=1)
            else:
                logits[is_stopped] = -float(np.inf)
                logits[is_stopped, 0] = 0
                scores_sum = scores[:, None] + logits
                seq_lengths[~is_stopped] += 1
                scores_sum_average = scores_sum / seq_lengths[:, None]
                scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
                next_tokens_source = next_tokens // scores_sum.shape[1]
                seq_lengths = seq_lengths[next_tokens_source]
                next_tokens = next_tokens % scores_sum.shape[1]
                next_tokens = next_tokens.unsqueeze(1)
                tokens = tokens[next_tokens_source]
                tokens = torch.cat((tokens, next_tokens), dim=1)
                generated = generated[next_tokens_source]
                scores = scores_sum_average * seq_lengths
                is_stopped = is_stopped[next_tokens_source]
            next_token_embed = model.gpt.transformer.wte(next_tokens.squeeze()).view(
                generated.shape[0], 1, -1
            )
            generated = torch.cat((generated, next_token_embed), dim=1)
            is_stopped = is_stopped + next_tokens.eq(stop_token_index).squeeze()
            if is_stopped.all():
                break
    scores = scores / seq_lengths
    output_list = tokens.cpu().numpy()
    output_texts = [
        tokenizer.decode(output[: int(length)])
        for output, length in zip(output_list, seq_lengths, strict=True)
    ]
    order = scores.argsort(descending=True)
    output_texts = [output_texts[i] for i in order]
    ids = [list(output_list[i][: int(seq_lengths[i])]) for i in order]
    return output_texts, ids


def reference_generate2(model, tokenizer, tokens=None, prompt=None, embed=None, entry_count=1,
                        entry_length=67, top_p=0.8, temperature=1.0, stop_token="."):  # fmt: skip
    model.eval()
    generated_list = []
    stop_token_index = tokenizer.encode(stop_token)[0]
    filter_value = -float("Inf")
    with torch.no_grad():
        for _ in range(entry_count):
            generated = embed
            for _ in range(entry_length):
                outputs = model.gpt(inputs_embeds=generated)
                logits = outputs.logits
                logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
                sorted_logits, sorted_indices = torch.sort(logits, descending=True)
                cumulative_probs = torch.cumsum(nnf.softmax(sorted_logits, dim=-1), dim=-1)
                sorted_indices_to_remove = cumulative_probs > top_p
                sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
                sorted_indices_to_remove[..., 0] = 0
                indices_to_remove = sorted_indices[sorted_indices_to_remove]
                logits[:, indices_to_remove] = filter_value
                next_token = torch.argmax(logits, -1).unsqueeze(0)
                next_token_embed = model.gpt.transformer.wte(next_token)
                if tokens is None:  # noqa: SIM108 - as published
                    tokens = next_token
                else:
                    tokens = torch.cat((tokens, next_token), dim=1)
                generated = torch.cat((generated, next_token_embed), dim=1)
                if stop_token_index == next_token.item():
                    break
            output_list = list(tokens.squeeze().cpu().numpy())
            output_text = tokenizer.decode(output_list)
            generated_list.append(output_text)
    return generated_list[0], [int(t) for t in output_list]


def test_greedy_and_beam_reproduce_clipcap_token_for_token(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    stop = stop_token_id(tokenizer)
    assert stop == tokenizer.encode(".")[0]
    gpt = tiny_gpt2(len(tokenizer), 64, seed=0, stop=stop, n_layer=2, n_head=2)
    captioner = Captioner(gpt, tokenizer)
    reference = ClipCapModel(gpt)
    greedy_lengths, beam_ends = [], set()
    for seed in (0, 3, 5):  # prefixes whose captions stop early or run to the limit
        prefix = torch.randn(10, 64, generator=torch.Generator().manual_seed(seed))
        text, ids = reference_generate2(reference, tokenizer, embed=prefix[None])
        assert greedy_tokens(gpt, prefix, stop) == ids
        assert captioner.caption(prefix[None]) == [text]
        texts, beam_ids = reference_generate_beam(reference, tokenizer, embed=prefix[None])
        ours = beam_tokens(gpt, prefix, stop, beam_size=5)
        assert [tokens for tokens, _ in ours] == beam_ids
        assert [tokenizer.decode(tokens) for tokens, _ in ours] == texts
        assert captioner.caption(prefix[None], beam=5) == [texts[0]]
        scores = [score for _, score in ours]
        assert scores == sorted(scores, reverse=True)
        greedy_lengths.append((len(ids), ids[-1] == stop))
        beam_ends |= {(len(tokens) == 67, tokens[-1] == stop) for tokens, _ in ours}
    # The cases cover both ends of a caption: the stop token, and the 67-token limit.
    assert (6, True) in greedy_lengths and (67, False) in greedy_lengths
    assert {(False, True), (True, False)} <= beam_ends
    with pytest.raises(ValueError, match=r"\(L, 64\)"):
        greedy_tokens(gpt, torch.randn(10, 768), stop)


def test_gpt2_from_every_source_and_tokenizer_errors(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    stop = stop_token_id(tokenizer)
    gpt = tiny_gpt2(len(tokenizer), 64, seed=1, stop=stop, n_layer=1, n_head=2)
    gpt.save_pretrained(tmp_path / "converted" / "gpt2")  # what `cd2p convert clipcap` writes
    state = {f"gpt.{k}": v for k, v in gpt.state_dict().items()}
    state["gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)  # legacy buffer
    state["clip_project.model.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "conceptual_weights.pt")  # ClipCap's own (pickled) file
    prefix = torch.randn(1, 10, 64)
    expected = Captioner(gpt, tokenizer).caption(prefix)
    for source in (tmp_path / "converted", tmp_path / "converted" / "gpt2",
                   tmp_path / "conceptual_weights.pt"):  # fmt: skip
        loaded = Captioner.from_pretrained(source, tokenizer_dir)
        assert not loaded.gpt2.training
        assert not any(p.requires_grad for p in loaded.gpt2.parameters())
        assert loaded.caption(prefix) == expected, source
    with pytest.raises(FileNotFoundError, match="holds no GPT-2"):
        load_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="vocab.json and merges.txt missing"):
        load_tokenizer(tmp_path / "converted")
    # Offline with an empty cache: the teacher's kind of message, naming the local options.
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    with pytest.raises(TeacherWeightsError) as error:
        load_tokenizer("openai-community/gpt2", cache_dir=empty)
    message = str(error.value)
    assert message.startswith("could not fetch the GPT-2 tokenizer (openai-community/gpt2")
    assert "--tokenizer PATH" in message and "--gpt2 PATH" in message
    assert spread_indices(10, 4) == [0, 3, 6, 9] and spread_indices(3, 5) == [0, 1, 2]


# -- `cd2p caption` -----------------------------------------------------------------------------


def write_pairs(root, rows: int = 3):
    """One prepared scene (the pairs layout) with distinct JPEG frames."""
    from datasets import Dataset

    from cd2p.data.scannet_pairs import pair_features

    images = []
    for i in range(rows):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), (60 * i, 120, 200 - 50 * i)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    eye = np.tile(np.eye(4, dtype=np.float32), (rows, 1, 1))
    columns = {
        "image": [{"bytes": b, "path": None} for b in images],
        "points": np.random.default_rng(0).random((rows, 128, 3), dtype=np.float32) * 3,
        "scene_id": ["scene0000_00"] * rows, "frame_index": np.arange(rows, dtype=np.int32) * 25,
        "pose": eye, "intrinsic_color": eye, "intrinsic_depth": eye,
    }  # fmt: skip
    Dataset.from_dict(columns, features=pair_features(128)).save_to_disk(
        str(root / "scenes" / "scene0000_00")
    )
    return root


@pytest.fixture(scope="module")
def caption_setup(tmp_path_factory, tokenizer_dir):
    """A random student (real Hub format) and a 768-wide GPT-2 in ClipCap's file format."""
    root = tmp_path_factory.mktemp("caption")
    torch.manual_seed(0)
    student = Cd2pStudent(backbone=dict(dim=32, depth=2, num_heads=2, num_groups=8,
                                        group_size=8), num_concepts=4, num_points=128,
                          voxel_size=0.05).eval()  # fmt: skip
    student.save_pretrained(root / "student")
    tokenizer = load_tokenizer(tokenizer_dir)
    gpt = tiny_gpt2(len(tokenizer), 768, seed=2, stop=stop_token_id(tokenizer), n_layer=1,
                    n_head=12, n_inner=64)  # fmt: skip
    torch.save({f"gpt.{k}": v for k, v in gpt.state_dict().items()}, root / "clipcap.pt")
    return root, student, Captioner(gpt, tokenizer)


def test_cli_captions_every_cloud_format(caption_setup, tokenizer_dir, tmp_path):
    root, student, captioner = caption_setup
    rng = np.random.default_rng(1)
    cloud = (rng.random((500, 3)) * [4, 3, 2.5]).astype(np.float32)  # a room-sized cloud
    ply, npy, txt = tmp_path / "scan.ply", tmp_path / "scan.npy", tmp_path / "scan.txt"
    write_mesh_ply(ply, cloud, np.full((500, 3), 128, np.uint8), np.zeros((0, 3), np.int64))
    np.save(npy, cloud)
    np.savetxt(txt, cloud)
    args = ["caption", "--model", str(root / "student"), "--gpt2", str(root / "clipcap.pt"),
            "--tokenizer", str(tokenizer_dir), "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, str(ply), str(npy), str(txt), "--out",
                                       str(tmp_path / "captions.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "captions.json").read_text())
    # The library on the same cloud: pre-training's preprocessing, the student, greedy decoding.
    with torch.no_grad():
        prefix = student(student.prepare_points(cloud)[None]).prefix
    expected = captioner.caption(prefix)[0]
    assert [c["caption"] for c in saved["captions"]] == [expected] * 3  # same cloud, 3 formats
    assert saved["decoding"] == "greedy (top-p 0.8)" and expected
    beam = CliRunner().invoke(main, [*args, str(npy), "--beam", "3", "--out",
                                     str(tmp_path / "beam.json")])  # fmt: skip
    assert beam.exit_code == 0, beam.output
    beamed = json.loads((tmp_path / "beam.json").read_text())["captions"][0]["caption"]
    assert beamed == captioner.caption(prefix, beam=3)[0]
    # Clear errors, no traceback.
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((5, 2)))
    res = CliRunner().invoke(main, [*args, str(bad)])
    assert res.exit_code == 1 and "bad.npy" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, [*args[:-4], "--tokenizer", "no-such-org/no-tokenizer",
                                    "--device", "cpu", str(npy)])  # fmt: skip
    message = " ".join(res.output.split())
    assert res.exit_code == 1 and "could not fetch the GPT-2 tokenizer" in message
    assert "--tokenizer PATH" in message
    res = CliRunner().invoke(main, [*args])
    assert res.exit_code == 2 and "CLOUD files and/or --pairs" in res.output


def test_cli_captions_pairs_into_a_contact_sheet(caption_setup, tokenizer_dir, tmp_path,
                                                 tiny_model_name):  # fmt: skip
    root, student, captioner = caption_setup
    pairs = write_pairs(tmp_path / "pairs")
    args = ["caption", "--model", str(root / "student"), "--gpt2", str(root / "clipcap.pt"),
            "--tokenizer", str(tokenizer_dir), "--device", "cpu", "--pairs", str(pairs),
            "--limit", "2", "--random-teacher", "--seed", "4",
            "--clip-model-name", tiny_model_name]  # fmt: skip
    html_sheet, png_sheet = tmp_path / "sheet.html", tmp_path / "sheet.png"
    result = CliRunner().invoke(main, [*args, "--sheet", str(html_sheet), "--out",
                                       str(tmp_path / "c.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "RANDOM teacher (seed 4)" in " ".join(result.output.split())
    captions = json.loads((tmp_path / "c.json").read_text())["captions"]
    assert [c["source"].split(": ")[1] for c in captions] == [
        "scene0000_00 frame 0", "scene0000_00 frame 50"]  # first and last of 3  # fmt: skip
    # The teacher's caption: CLIP -> ClipCap mapper -> the same GPT-2, from the RGB frame.
    from cd2p.data.pairs import PairDataset
    from cd2p.models.teacher import Teacher

    teacher = Teacher.random("prefix", 4, model_name=tiny_model_name)
    item = PairDataset(pairs, with_image=True)[2]
    teacher_prefix = teacher(teacher.preprocess([item["image"]]))
    assert captions[1]["teacher_caption"] == captioner.caption(teacher_prefix)[0]
    assert captions[1]["caption"] == captioner.caption(student.encode([item["points"]]).prefix)[0]
    page = html_sheet.read_bytes().decode()  # as written: random tokens decode to any bytes
    assert page.count("<tr>") == 3 and page.count("data:image/jpeg;base64") == 2
    assert page.count("data:image/png;base64") == 2 and "RANDOM teacher" in page
    assert html.escape(printable(captions[0]["caption"])) in page
    result = CliRunner().invoke(main, [*args, "--sheet", str(png_sheet)])
    assert result.exit_code == 0, result.output
    with Image.open(png_sheet) as picture:
        assert picture.size[0] > 800 and picture.size[1] > 400
