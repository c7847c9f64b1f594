"""SIMOneStepPipeline behaves as a diffusers user expects a pipeline to: from_pipe both ways, None components (the
low-memory recipe), save/load with and without optional components, loading with stock diffusers alone, dtype and
to(), batch consistency with generators, num_images_per_prompt, CPU offload."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, PixArtAlphaPipeline
from stock_diffusers import generate_with_stock_diffusers

import sim_diffusers
from sim_diffusers import SIMOneStepPipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "A photo of a blue dog sitting in the snow"]  # different token counts: masks must follow


def noise(batch, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def latents_of(pipe, prompt=PROMPTS, z=None, **kwargs):
    z = noise(1 if isinstance(prompt, str) else len(prompt)) if z is None else z
    return pipe(prompt, latents=z, output_type="latent", **kwargs).images


def no_forward(module):
    """Make any forward call of `module` fail: a check must come before the expensive work."""

    def hook(*_):
        raise AssertionError(f"{type(module).__name__} ran before the input check")

    return module.register_forward_pre_hook(hook)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_path):
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_teacher_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(teacher):
    """Distinct weights from the teacher's and a non-default t*, so that carrying either over is checked."""
    pipe = SIMOneStepPipeline.from_teacher(teacher, conditioning_timestep=400)
    perturb(pipe.transformer, seed=11)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("conventions") / "sim"
    pipe.save_pretrained(folder)
    return folder


def test_from_pipe_to_pixart_alpha_and_back_shares_components_and_keeps_t_star(pipe):
    alpha = PixArtAlphaPipeline.from_pipe(pipe)
    for name, component in pipe.components.items():
        assert getattr(alpha, name) is component, name  # shared, not copied
    back = SIMOneStepPipeline.from_pipe(alpha)
    assert (back.conditioning_timestep, back.config.max_sequence_length) == (400, 120)
    assert back.transformer is pipe.transformer
    torch.testing.assert_close(latents_of(back), latents_of(pipe), rtol=0, atol=0)


def test_from_pipe_of_a_pixart_alpha_teacher_is_the_undistilled_generator(teacher):
    one_step = SIMOneStepPipeline.from_pipe(teacher)
    for name, component in teacher.components.items():
        assert getattr(one_step, name) is component, name
    assert isinstance(one_step.scheduler, DPMSolverMultistepScheduler)  # the teacher's: only its schedule is read
    assert one_step.config.max_sequence_length == 120
    reference = SIMOneStepPipeline.from_teacher(teacher)
    assert one_step.conditioning_timestep == reference.conditioning_timestep == 440
    torch.testing.assert_close(latents_of(one_step), latents_of(reference), rtol=0, atol=1e-6)


def test_low_memory_recipe_text_encoder_alone_then_transformer_alone(pipe, saved):
    full = SIMOneStepPipeline.from_pretrained(saved)
    text_only = SIMOneStepPipeline.from_pretrained(saved, transformer=None, vae=None)
    assert text_only.transformer is None and text_only.vae is None
    embeds, mask, neg, neg_mask = text_only.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert neg is None and neg_mask is None
    reference = full.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close((embeds, mask), reference[:2], rtol=0, atol=0)
    hook = no_forward(text_only.text_encoder)
    with pytest.raises(ValueError, match=r"needs a PixArtTransformer2DModel as `transformer`, got NoneType\."):
        text_only(PROMPTS)
    hook.remove()

    image_only = SIMOneStepPipeline.from_pretrained(saved, text_encoder=None, tokenizer=None)
    assert image_only.text_encoder is None and image_only.tokenizer is None
    z = noise(2)
    from_embeds = image_only(prompt_embeds=embeds, prompt_attention_mask=mask, latents=z, output_type="np").images
    from_text = full(PROMPTS, latents=z, output_type="np").images
    assert np.abs(from_embeds - from_text).max() < 1e-6 and np.abs(from_text - 0.5).max() > 1e-2
    hook = no_forward(image_only.transformer)
    for call in (lambda: image_only(PROMPTS), lambda: image_only.encode_prompt(PROMPTS)):
        with pytest.raises(ValueError, match=r"needs a `tokenizer` and a `text_encoder` to encode prompts"):
            call()
    hook.remove()


def test_every_component_may_be_none_and_is_asked_for_where_it_is_used(pipe):
    empty = SIMOneStepPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=None, scheduler=None)
    assert set(empty.components) == {"tokenizer", "text_encoder", "vae", "transformer", "scheduler"}
    assert all(c is None for c in empty.components.values())
    assert empty.config.max_sequence_length == 120 and empty.conditioning_timestep is None

    no_vae = SIMOneStepPipeline.from_pipe(pipe, vae=None)
    assert no_vae.vae is None
    torch.testing.assert_close(latents_of(no_vae), latents_of(pipe), rtol=0, atol=0)  # latents need no VAE
    hook = no_forward(no_vae.transformer)
    with pytest.raises(ValueError, match=r'needs a `vae` to decode images: load it, or pass output_type="latent"'):
        no_vae(PROMPTS, output_type="np")
    hook.remove()
    no_scheduler = SIMOneStepPipeline.from_pipe(pipe, scheduler=None)
    with pytest.raises(ValueError, match="needs a `scheduler`"):
        no_scheduler(PROMPTS, output_type="latent")


def test_save_and_load_without_the_optional_components(pipe, saved, tmp_path):
    full = SIMOneStepPipeline.from_pretrained(saved)
    assert full.text_encoder is not None and full.tokenizer is not None  # saved with them: loaded with them
    without = SIMOneStepPipeline.from_pretrained(saved, text_encoder=None, tokenizer=None)
    without.save_pretrained(tmp_path / "no_t5")
    index = json.loads((tmp_path / "no_t5" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert not (tmp_path / "no_t5" / "text_encoder").exists()
    reloaded = SIMOneStepPipeline.from_pretrained(tmp_path / "no_t5")
    assert reloaded.text_encoder is None and reloaded.tokenizer is None
    assert reloaded.conditioning_timestep == 400
    embeds, mask, _, _ = full.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    z = noise(2)
    a = reloaded(prompt_embeds=embeds, prompt_attention_mask=mask, latents=z, output_type="latent").images
    assert (a - latents_of(full, z=z)).abs().max() < 1e-6


def test_a_saved_folder_carries_the_packages_own_code(saved):
    package = Path(sim_diffusers.__file__).parent
    carried = sorted(p.name for p in saved.glob("*.py"))
    assert carried == ["generator.py", "pipeline_sim_one_step.py", "schedule.py", "teachers.py"]
    for name in carried:  # copies of the one home of each module, never a second version
        assert (saved / name).read_bytes() == (package / name).read_bytes(), name

    def sibling_imports(path):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        return {f"{n.module}.py" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level >= 1}

    # diffusers copies, for a local folder, only the files the pipeline module itself imports: every sibling any
    # carried file needs must be among them, and no import may reach above the folder (`from ..x`).
    direct = sibling_imports(saved / "pipeline_sim_one_step.py")
    assert direct == set(carried) - {"pipeline_sim_one_step.py"}
    for name in carried:
        assert sibling_imports(saved / name) <= direct, name
        assert not re.search(r"^\s*from\s+\.\.", (saved / name).read_text(encoding="utf-8"), re.MULTILINE), name
        assert not re.search(
            r"^\s*(from|import)\s+sim_diffusers", (saved / name).read_text(encoding="utf-8"), re.MULTILINE
        )
    # Stock diffusers reads the [module, class] form; this class reads its own name and runs no code from the folder.
    assert DiffusionPipeline.load_config(saved)["_class_name"] == ["pipeline_sim_one_step", "SIMOneStepPipeline"]
    assert SIMOneStepPipeline.load_config(saved)["_class_name"] == "SIMOneStepPipeline"


def test_stock_diffusers_loads_a_saved_folder_without_this_package(saved, tmp_path):
    z = noise(2, seed=3)
    outputs, report = generate_with_stock_diffusers(saved, PROMPTS, z, tmp_path / "stock", resave=tmp_path / "resaved")
    assert report["class"] == "SIMOneStepPipeline" and report["module"].startswith("diffusers_modules.")
    assert report["config"]["conditioning_timestep"] == 400
    ours = SIMOneStepPipeline.from_pretrained(saved)
    ours.set_progress_bar_config(disable=True)
    assert torch.equal(outputs["latent"], latents_of(ours, z=z))
    assert torch.equal(outputs["pt"], ours(PROMPTS, latents=z, output_type="pt").images)
    # The folder the stock-loaded pipeline saved carries the same code again.
    assert sorted(p.name for p in (tmp_path / "resaved").glob("*.py")) == sorted(p.name for p in saved.glob("*.py"))


def test_dtype_on_loading_and_to(saved):
    reference = latents_of(SIMOneStepPipeline.from_pretrained(saved))
    bf16 = SIMOneStepPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    modules = {name: c for name, c in bf16.components.items() if isinstance(c, torch.nn.Module)}
    assert set(modules) == {"text_encoder", "vae", "transformer"}
    assert all(p.dtype == torch.bfloat16 for m in modules.values() for p in m.parameters())
    assert bf16.dtype == torch.bfloat16
    low = latents_of(bf16)
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()  # bf16 rounding, same model
    bf16.to("cpu", torch.float32)
    assert all(p.dtype == torch.float32 for m in modules.values() for p in m.parameters())
    assert bf16.device.type == "cpu"


def test_batch_consistency_with_a_generator_per_image(pipe):
    prompts = PROMPTS + ["a green bird"]
    seeds = [5, 6, 7]
    batch = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent").images
        assert (batch[i : i + 1] - alone).abs().max() < 1e-5, prompt
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # the images do differ
    again = pipe(prompts, generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.equal(again, pipe(prompts, generator=torch.Generator().manual_seed(5), output_type="latent").images)


def test_num_images_per_prompt_with_prompts_and_with_prompt_embeds(pipe):
    n = 2
    gens = lambda: [torch.Generator().manual_seed(20 + k) for k in range(len(PROMPTS) * n)]  # noqa: E731
    from_text = pipe(PROMPTS, num_images_per_prompt=n, generator=gens(), output_type="latent").images
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    from_embeds = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        num_images_per_prompt=n,
        generator=gens(),
        output_type="latent",
    ).images
    assert from_text.shape == from_embeds.shape == (len(PROMPTS) * n, 4, 8, 8)
    assert (from_text - from_embeds).abs().max() < 1e-5
    for k in range(len(PROMPTS) * n):  # prompt i's copies are consecutive, image k drawn from generator k
        alone = pipe(PROMPTS[k // n], generator=torch.Generator().manual_seed(20 + k), output_type="latent").images
        assert (from_text[k : k + 1] - alone).abs().max() < 1e-5, k


def test_model_cpu_offload_seq_names_every_model_and_offloading_keeps_outputs(saved):
    full = SIMOneStepPipeline.from_pretrained(saved)
    models = [name for name, c in full.components.items() if isinstance(c, torch.nn.Module)]
    assert sorted(full.model_cpu_offload_seq.split("->")) == sorted(models)
    assert set(full._optional_components) == {"tokenizer", "text_encoder"}  # all a prompt_embeds call can lack
    embeds, mask, _, _ = full.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    offloaded = SIMOneStepPipeline.from_pretrained(saved, text_encoder=None, tokenizer=None)
    offloaded.set_progress_bar_config(disable=True)
    z = noise(2)
    expected = offloaded(prompt_embeds=embeds, prompt_attention_mask=mask, latents=z, output_type="np").images
    offloaded.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # hooks re-attach after the first call's maybe_free_model_hooks
        images = offloaded(prompt_embeds=embeds, prompt_attention_mask=mask, latents=z, output_type="np").images
        assert np.abs(images - expected).max() < 1e-6


def test_no_torch_dtype_left_in_docs_and_examples():
    """diffusers deprecates `torch_dtype=` for `dtype=`; what users copy must use the new name."""
    files = [
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
        *(REPO / "examples").glob("*.py"),
        *(REPO / "model_cards").glob("*.md"),
    ]
    files.append(REPO / "sim_diffusers" / "pipeline_sim_one_step.py")  # its example docstring
    assert len(files) > 5
    offenders = [str(f.relative_to(REPO)) for f in files if "torch_dtype=" in f.read_text(encoding="utf-8")]
    assert not offenders


def test_a_folder_saved_before_the_carried_code_still_loads(saved, tmp_path):
    """Folders written before this layout: a plain class name, no code files, no max_sequence_length (alpha's)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(saved, old, ignore=shutil.ignore_patterns("*.py"))
    index = json.loads((old / "model_index.json").read_text())
    index["_class_name"] = "SIMOneStepPipeline"
    del index["max_sequence_length"]
    (old / "model_index.json").write_text(json.dumps(index))
    loaded = SIMOneStepPipeline.from_pretrained(old)
    assert (loaded.conditioning_timestep, loaded.config.max_sequence_length) == (400, 120)
    assert torch.equal(latents_of(loaded), latents_of(SIMOneStepPipeline.from_pretrained(saved)))
