"""Evaluation: every scorer on tiny random models of the real architecture, loaded through its real loading path,
hand-computed checks of the aesthetic head and the CLIP-score arithmetic, and examples/evaluate.py end to end on the
tiny PixArt fixture with the report opened in headless Chromium. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sim_diffusers.evaluation import RewardHead, get_scorer, summarize
from sim_diffusers.evaluation._clip import load_clip
from sim_diffusers.evaluation.aesthetic import AestheticScorer
from sim_diffusers.evaluation.clip_score import clip_score_from_embeds
from sim_diffusers.evaluation.generation import ModelSpec
from sim_diffusers.evaluation.imagereward import REWARD_MEAN, REWARD_STD

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat on a mat", "a dog"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def tiny_images(n=2, size=(40, 30)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------- tiny models saved the way the Hub ships them


def tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]  # transformers 5 takes pairs
    for merge in merges:
        vocab["".join(merge)] = len(vocab)
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIPModel + CLIPProcessor folder: 32 px ViT, 8-d projection, BPE tokenizer from an in-memory vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = tiny_clip_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            eos_token_id=eos,
            pad_token_id=eos,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def aesthetic_head_pth(tmp_path_factory, tiny_clip):
    """The head as upstream ships it: a .pth state dict of layers.{0,2,4,6,7}, here on 8-d embeddings."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(RewardHead(input_size=8).state_dict(), path)
    return path


# Upstream ImageReward.pt names (BLIP's timm ViT and med.py BERT), written out here independently of our renaming.
def upstream_vision_names(depth):
    names = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    for i in range(depth):
        for ours, theirs in [
            ("norm1", "layer_norm1"),
            ("norm2", "layer_norm2"),
            ("attn.qkv", "self_attn.qkv"),
            ("attn.proj", "self_attn.projection"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = f"encoder.layers.{i}.{theirs}.{p}"
    return names


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """ImageReward.pt + med_config.json in upstream's layout from a tiny BLIP, plus a tiny BERT tokenizer folder.
    Returns (folder, tokenizer folder, the transformers models and head it was made from)."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    path = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "on", "mat", "dog"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.save_pretrained(path / "tokenizer")
    med_config = dict(
        vocab_size=len(words) + 2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=40,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
        encoder_width=768,
        add_cross_attention=True,
    )
    (path / "med_config.json").write_text(json.dumps(med_config))

    torch.manual_seed(2)
    # 128 wide -> two 64-d heads, as BLIP's ViTs; 32 px in 16 px patches.
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            layer_norm_eps=1e-6,
        )
    ).eval()
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=len(words) + 2,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=40,
            encoder_hidden_size=128,
        ),
        add_pooling_layer=False,
    ).eval()
    head = RewardHead(input_size=16).eval()
    vision_state = vision.state_dict()
    state = {f"blip.visual_encoder.{theirs}": vision_state[ours] for theirs, ours in upstream_vision_names(1).items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # saved by upstream, not by us
    state.update({"blip.vision_proj.weight": torch.zeros(4, 128), "blip.text_proj.weight": torch.zeros(4, 16)})
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    assert len(state) == len(vision_state) + len(text.state_dict()) + 1 + 2 + 10
    torch.save(state, path / "ImageReward.pt")
    return path, path / "tokenizer", (vision, text, head, tokenizer)


# ---------------------------------------------------------------- arithmetic against hand-computed values


def test_aesthetic_head_on_a_fixed_embedding(tiny_clip):
    """Head = diagonal pass-through of the first two coordinates, then 1*x0 + 2*x1 + 0.5, on the unit-norm input."""
    head = RewardHead(input_size=8)
    with torch.no_grad():
        for i in (0, 2, 4, 6):
            layer = head.layers[i]
            layer.weight.zero_(), layer.bias.zero_()
            layer.weight[0, 0] = layer.weight[1, 1] = 1.0
        head.layers[7].weight.zero_()
        head.layers[7].weight[0, :2] = torch.tensor([1.0, 2.0])
        head.layers[7].bias.fill_(0.5)
    scorer = AestheticScorer(head, *load_clip(tiny_clip))
    embeds = torch.tensor([[3.0, 4.0, 0, 0, 0, 0, 0, 0], [0, -10.0, 0, 0, 0, 0, 0, 0]])
    # |(3, 4)| = 5 -> (0.6, 0.8) -> 0.6 + 1.6 + 0.5;  (0, -1) -> -2 + 0.5
    torch.testing.assert_close(scorer.score_image_embeds(embeds), torch.tensor([2.7, -1.5]))


def test_reward_head_loads_upstream_names_and_dropout_is_off(aesthetic_head_pth):
    state = torch.load(aesthetic_head_pth, weights_only=True)
    assert sorted({k.rsplit(".", 1)[0] for k in state}) == [f"layers.{i}" for i in (0, 2, 4, 6, 7)]
    head = RewardHead.from_state_dict(state)
    x = torch.randn(3, 8)
    torch.testing.assert_close(head(x), head(x))  # eval(): dropout inactive
    w = [head.layers[i] for i in (0, 2, 4, 6, 7)]
    expected = x
    for layer in w:  # no activation anywhere: a product of affine maps
        expected = expected @ layer.weight.T + layer.bias
    torch.testing.assert_close(head(x), expected.squeeze(-1))


def test_clip_score_arithmetic():
    image = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    text = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 0.5]])
    # cos = 1/sqrt(2), -1 (clamped to 0), 1
    torch.testing.assert_close(clip_score_from_embeds(image, text), torch.tensor([100 / math.sqrt(2), 0.0, 100.0]))


def test_summarize_is_mean_and_standard_error():
    s = summarize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert s["n"] == 4 and s["mean"] == pytest.approx(3.0)
    assert s["sem"] == pytest.approx(math.sqrt(((4 + 1 + 0 + 9) / 3) / 4))
    assert summarize([5.0])["sem"] is None


# ---------------------------------------------------------------- scorers through their real loading paths


def test_aesthetic_scorer_from_pth_and_safetensors(tiny_clip, aesthetic_head_pth, tmp_path):
    from safetensors.torch import save_file

    images = tiny_images(3)
    scorer = get_scorer("aesthetic", aesthetic_head_pth, clip_model=str(tiny_clip))
    scores = scorer(images, ["x"] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # The same head as safetensors, found by name in a folder.
    save_file(torch.load(aesthetic_head_pth, weights_only=True), tmp_path / "aesthetic_head.safetensors")
    again = get_scorer("aesthetic", tmp_path, clip_model=str(tiny_clip))(images, ["x"] * 3)
    torch.testing.assert_close(again, scores)


def test_clip_score_and_pickscore_scorers(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = tiny_images(2)
    clip_scores = get_scorer("clip_score", tiny_clip)(images, PROMPTS)
    pick = get_scorer("pickscore", tiny_clip, processor=str(tiny_clip))
    pick_scores = pick(images, PROMPTS)
    assert clip_scores.shape == pick_scores.shape == (2,)
    # Same CLIP: CLIP score is 100 * max(PickScore's raw cosine, 0).
    torch.testing.assert_close(clip_scores, 100 * pick_scores.clamp(min=0))
    # And the cosine is that of transformers' own CLIP forward (logits_per_image / logit_scale).
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**processor(text=PROMPTS, images=images, return_tensors="pt", padding=True))
    torch.testing.assert_close(pick_scores, out.logits_per_image.diagonal() / model.logit_scale.exp())
    assert pick.logit_scale == pytest.approx(model.logit_scale.exp().item())


def test_imagereward_scorer_matches_its_transformers_parts(tiny_imagereward):
    from transformers import CLIPImageProcessorPil

    path, tokenizer_path, (vision, text, head, tokenizer) = tiny_imagereward
    scorer = get_scorer("imagereward", path, tokenizer=str(tokenizer_path))
    images = tiny_images(2)
    rewards = scorer(images, PROMPTS)
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
    assert scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [11, 12]

    # Reference: upstream's forward written out on the original transformers modules.
    pixels = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images, return_tensors="pt"
    )["pixel_values"]
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = vision(pixel_values=pixels).last_hidden_state
        cls = text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
        ).last_hidden_state[:, 0]
        expected = (head(cls) - REWARD_MEAN) / REWARD_STD
    torch.testing.assert_close(rewards, expected)


class MeanStdFeatures(nn.Module):
    """A stand-in Inception: per-channel mean and std of uint8 images, with the NVIDIA detector's signature."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_with_torchscript_and_clip_features(tiny_clip, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(tiny_images(6, size=(48, 40))):
        image.save(reference / f"{i}.png")
    script = tmp_path / "features.pt"
    with pytest.warns(DeprecationWarning):  # TorchScript is deprecated in torch, but is how Inception ships for FID
        torch.jit.script(MeanStdFeatures()).save(str(script))

    for weights in (script, tiny_clip):
        fid = get_scorer("fid", weights, reference=str(reference))
        assert fid.num_reference == 6 and not fid.per_image
        fid.update(tiny_images(6, size=(48, 40)))  # the very same images
        assert fid.compute() == pytest.approx(0.0, abs=1e-3)
        fid.reset()
        fid.update([Image.new("RGB", (48, 40), c) for c in [(250, 0, 0), (0, 250, 0), (0, 0, 250), (90, 90, 90)]])
        value = fid.compute()
        assert value > 0.01

        # Saved statistics reproduce the folder's FID.
        stats = tmp_path / f"stats-{Path(weights).name}.safetensors"
        fid.save_reference_stats(stats)
        again = get_scorer("fid", weights, reference=str(stats))
        again.update([Image.new("RGB", (48, 40), c) for c in [(250, 0, 0), (0, 250, 0), (0, 0, 250), (90, 90, 90)]])
        assert again.compute() == pytest.approx(value, rel=1e-4)


def test_model_spec_parsing():
    spec = ModelSpec.parse("Teacher=/models/pixart:2:4.5")
    assert (spec.label, spec.path, spec.steps, spec.guidance_scale) == ("Teacher", "/models/pixart", 2, 4.5)
    spec = ModelSpec.parse("org/sim-model")
    assert (spec.label, spec.steps, spec.guidance_scale) == ("sim-model", None, None)
    with pytest.raises(ValueError, match="STEPS must be an integer"):
        ModelSpec.parse("x:two")


# ---------------------------------------------------------------- examples/evaluate.py end to end


def load_evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from sim_diffusers import SIMOneStepPipeline
    from sim_diffusers.testing import build_tiny_pixart_pipeline

    root = tmp_path_factory.mktemp("models")
    teacher = build_tiny_pixart_pipeline(root / "tiny-pixart", seed=0)
    SIMOneStepPipeline.from_teacher(str(teacher)).save_pretrained(root / "tiny-sim")
    return root / "tiny-sim", teacher


@pytest.fixture(scope="module")
def evaluation_run(tmp_path_factory, tiny_models, tiny_clip, aesthetic_head_pth, tiny_imagereward):
    sim, teacher = tiny_models
    imagereward_path, imagereward_tokenizer, _ = tiny_imagereward
    out = tmp_path_factory.mktemp("eval")
    reference = out / "reference"
    reference.mkdir()
    for i, image in enumerate(tiny_images(4, size=(64, 64))):
        image.save(reference / f"{i}.png")
    captions = out / "captions.txt"
    captions.write_text("a red cat on a mat\na dog in the snow\n\na bird on a tree\n")
    evaluate = load_evaluate_script()
    args = evaluate.parse_args(
        [
            "--model",
            f"SIM={sim}",
            "--model",
            f"PixArt={teacher}:2:4.5",
            "--captions",
            str(captions),
            "--num_samples",
            "4",
            "--batch_size",
            "3",
            "--seed",
            "7",
            "--no_resolution_binning",
            "--metrics",
            "aesthetic,imagereward,pickscore,clip_score,fid",
            "--aesthetic_head",
            str(aesthetic_head_pth),
            "--aesthetic_clip",
            str(tiny_clip),
            "--imagereward_model",
            str(imagereward_path),
            "--imagereward_tokenizer",
            str(imagereward_tokenizer),
            "--pickscore_model",
            str(tiny_clip),
            "--pickscore_processor",
            str(tiny_clip),
            "--clip_score_model",
            str(tiny_clip),
            "--fid_model",
            str(tiny_clip),
            "--fid_reference",
            str(reference),
            "--output_dir",
            str(out / "run"),
            "--device",
            "cpu",
        ]
    )
    results = evaluate.main(args)
    return out / "run", results


def test_evaluate_writes_results_and_report(evaluation_run):
    out, results = evaluation_run
    saved = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["SIM", "PixArt"]
    sim, teacher = saved["models"]
    assert (sim["pipeline"], sim["steps"], sim["guidance_scale"]) == ("SIMOneStepPipeline", 1, None)
    assert (teacher["pipeline"], teacher["steps"], teacher["guidance_scale"]) == ("PixArtAlphaPipeline", 2, 4.5)
    assert [s["prompt"] for s in saved["samples"]] == [
        "a red cat on a mat",
        "a dog in the snow",
        "a bird on a tree",
        "a red cat on a mat",
    ]
    assert [s["seed"] for s in saved["samples"]] == [7, 8, 9, 10]
    for model in saved["models"]:
        assert len(model["images"]) == 4 and all((out / p).is_file() for p in model["images"])
        assert Image.open(out / model["images"][0]).size == (64, 64)
        for name in ("aesthetic", "imagereward", "pickscore", "clip_score"):
            assert len(model["scores"][name]) == 4
            s = model["summary"][name]
            assert s["n"] == 4 and s["mean"] == pytest.approx(np.mean(model["scores"][name]))
        assert model["summary"]["fid"]["reference_n"] == 4 and math.isfinite(model["summary"]["fid"]["value"])
    assert (out / "fid_reference_stats.safetensors").is_file()
    # The one-step model and the teacher start from the same noise but are different samplers.
    assert not np.array_equal(
        np.asarray(Image.open(out / sim["images"][0])), np.asarray(Image.open(out / teacher["images"][0]))
    )


def test_evaluate_is_reproducible_per_sample(evaluation_run, tiny_models, tmp_path):
    """Sample i depends on its seed only: a second run with another batch size gives the same first image."""
    out, _ = evaluation_run
    sim, _ = tiny_models
    evaluate = load_evaluate_script()
    args = evaluate.parse_args(
        [
            "--model",
            f"SIM={sim}",
            "--captions",
            str(out.parent / "captions.txt"),
            "--num_samples",
            "2",
            "--batch_size",
            "1",
            "--seed",
            "7",
            "--metrics",
            "",
            "--no_resolution_binning",
            "--output_dir",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    results = evaluate.main(args)
    first = results["models"][0]["images"][0]
    alone, batched = (np.asarray(Image.open(root / first), dtype=np.int16) for root in (tmp_path, out))
    assert np.abs(alone - batched).max() <= 1  # batched CPU matmuls may round a pixel differently


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_opens_in_headless_chromium(evaluation_run, tmp_path):
    out, _ = evaluation_run
    report = (out / "report.html").resolve()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    table = re.search(r'<table id="metrics">.*?</table>', dom, re.S).group(0)
    for text in ("SIM", "PixArt", "Aesthetic", "ImageReward", "PickScore", "CLIP score", "FID", "±"):
        assert text in table
    assert len(re.findall(r"<tr>", table)) == 3  # header + two models
    grid = re.search(r'<div class="grid" id="samples".*', dom, re.S).group(0)
    sources = re.findall(r'<img src="([^"]+)"', grid)
    assert len(sources) == 2 * 4 and all((out / s).is_file() for s in sources)

    screenshot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={screenshot}", "--window-size=1280,1600", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, table and the noisy sample images drawn
    if os.environ.get("SIM_KEEP_REPORT_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["SIM_KEEP_REPORT_SCREENSHOT"])
