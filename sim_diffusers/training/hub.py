"""Model card and Hub upload of a trained output_dir; the upload can be retried on its own:

    python -m sim_diffusers.training.hub OUTPUT_DIR --hub_model_id your-name/sim-pixart [--private]

The token comes from `--hub_token`, the HF_TOKEN environment variable or `huggingface-cli login`; it is never
printed, logged or written anywhere. What is uploaded is an allow-list (`upload_files`): the pipeline, its model card
and validation grid; the card shows local paths by their last part only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..teachers import PIXART_ALPHA, family_named

# Belt and braces: never uploaded even if the allow-list below ever named them.
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    ".tmp-*",
    ".tmp-*/**",
    "logs/**",
    "abandoned/**",
    "text_embedding_cache/**",
]
SECRET_ARGUMENTS = ("hub_token",)
# The teacher family's tag (pixart-alpha or pixart-sigma) goes after "diffusers".
MODEL_CARD_TAGS = [
    "text-to-image",
    "diffusers",
    "one-step",
    "distillation",
    "score-implicit-matching",
    "sim_diffusers",
]


# Arguments that name local files or folders: a published model card shows only their last part.
PATH_ARGUMENTS = (
    "pretrained_model_name_or_path",
    "caption_file",
    "dataset_name",
    "cache_dir",
    "output_dir",
    "text_embedding_cache",
    "logging_dir",
    "resume_from_checkpoint",
)


def public_arguments(args: dict) -> dict:
    """Arguments safe to save, log and show: secrets removed."""
    return {k: v for k, v in args.items() if k not in SECRET_ARGUMENTS and not k.startswith("_")}


def publishable_arguments(args: dict) -> dict:
    """public_arguments without local paths: a path argument that names something on this machine (or any absolute
    path) shows as `<local>/name`; Hub ids stay as they are."""
    shown = {}
    for key, value in public_arguments(args).items():
        if (
            key in PATH_ARGUMENTS
            and isinstance(value, str)
            and (Path(value).expanduser().exists() or Path(value).is_absolute())
        ):
            value = f"<local>/{Path(value).name}"
        shown[key] = value
    return shown


def upload_files(output_dir: str | os.PathLike) -> list[str]:
    """What a model repo should hold of output_dir, by relative path: the pipeline (model_index.json, the components
    it names, the code files it carries), the model card and the validation grid it shows. Never checkpoints, logs,
    caches (whose index lists every training caption), training records (local paths) or anything else."""
    import json

    from ..pipeline_sim_one_step import pipeline_code_files

    output_dir = Path(output_dir)
    index = json.loads((output_dir / "model_index.json").read_text())
    components = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]
    files = ["model_index.json", "README.md", "validation/latest.png"]
    files += [path.name for path in pipeline_code_files()]
    for name in components:
        folder = output_dir / name
        if folder.is_dir():
            files += [
                path.relative_to(output_dir).as_posix()
                for path in sorted(folder.rglob("*"))
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
            ]
    return [name for name in files if (output_dir / name).is_file()]


def resolve_token(explicit: str | None) -> str | None:
    """The token to use, without any network call: --hub_token, HF_TOKEN, or the stored login."""
    if explicit:
        return explicit
    from huggingface_hub import get_token

    return get_token()


def render_model_card(
    template_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base_model: str | None,
    repo_id: str | None,
    conditioning_timestep: int,
    settings: dict,
    teacher_family: str = PIXART_ALPHA.name,
    validation_image: str | None,
    validation_prompts: list[str] | None,
    use_ema: bool,
    license: str = "openrail++",
    generator_timesteps: list[int] | None = None,
    validation_values: dict | None = None,
) -> Path:
    """Write output_dir/README.md from the template: YAML metadata, loading code, training settings, samples.

    teacher_family: the teacher's family name (`sim_diffusers.teachers`: "PixArt-alpha" or "PixArt-Σ").
    validation_values: the last line of the run's logs/validation.jsonl (`training.validation`), or None.
    """
    import jinja2
    from huggingface_hub import ModelCardData

    family = family_named(teacher_family)
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=base_model,
        license=license,
        tags=MODEL_CARD_TAGS[:2] + [family.hub_tag] + MODEL_CARD_TAGS[2:],
        inference=False,
    )
    repo_id = repo_id or Path(output_dir).resolve().name
    if validation_image:
        prompts = "; ".join(f"`{p}`" for p in (validation_prompts or []))
        validation = (
            f"![validation samples]({validation_image})\n\nOne row per prompt: the generator's samples (left) and "
            f"the teacher's from the same noises (right). Prompts: {prompts}."
        )
    else:
        validation = "No validation images were generated in this run."
    shown = publishable_arguments(settings)
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(shown.items()))
    template = jinja2.Template(Path(template_path).read_text(encoding="utf-8"), keep_trailing_newline=True)
    text = template.render(
        card_data=card_data.to_yaml(),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        teacher=shown.get("pretrained_model_name_or_path"),
        teacher_family=family.name,
        conditioning_timestep=conditioning_timestep,
        generator_timesteps=generator_timesteps or [conditioning_timestep],
        num_steps=len(generator_timesteps or [conditioning_timestep]),
        example_prompt=(validation_prompts or ["A small cactus with a happy face in the Sahara desert."])[0],
        validation_section=validation,
        validation_values=validation_values_section(validation_values),
        settings_table=rows,
        weights_kind="an exponential moving average (EMA) of the generator"
        if use_ema
        else "the generator's last weights",
    )
    path = Path(output_dir) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def validation_values_section(values: dict | None) -> str:
    """The last validation against the teacher as a markdown table (`training.validation`), or a line saying there
    was none."""
    if not values:
        return "No validation against the teacher was run."
    rows = "\n".join(
        f"| `{prompt}` | {s['diversity_ratio']:.3f} | {s['teacher_agreement']:.3f} |"
        for prompt, s in values["prompts"].items()
    )
    return (
        f"At step {values['step']}, on fixed noises shared with the teacher's ODE samples: the **diversity ratio** "
        "(the spread of the generator's samples over the teacher's; 1 is the teacher's diversity, near 0 a collapse "
        "onto one look) and the **teacher agreement** (the distance to the teacher's sample from the same noise "
        "over the teacher's spread; 0 is the teacher's own sample, 1 an unrelated one).\n\n"
        "| prompt | diversity ratio | teacher agreement |\n|---|---|---|\n"
        f"{rows}\n| **minimum / mean** | **{values['diversity_ratio_min']:.3f}** | "
        f"**{values['teacher_agreement']:.3f}** |"
    )


def push_output_dir(output_dir: str | os.PathLike, hub_model_id: str, token: str | None, private: bool = False) -> str:
    """Create the repo if needed and upload what a model repo should hold of output_dir (`upload_files`); returns
    the repo id."""
    from huggingface_hub import create_repo, upload_folder

    files = upload_files(output_dir)
    repo_id = create_repo(hub_model_id, private=private, token=token, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="Upload one-step SIM generator",
        allow_patterns=files,  # exact paths: no pattern character appears in the names the trainer writes
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
    return repo_id


def retry_command(output_dir, hub_model_id, private: bool) -> str:
    folder, repo = shlex.quote(str(output_dir)), shlex.quote(hub_model_id)
    command = f"python -m sim_diffusers.training.hub {folder} --hub_model_id {repo}"
    return command + (" --private" if private else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Upload a trained sim_diffusers output_dir to the Hugging Face Hub.")
    parser.add_argument("output_dir")
    parser.add_argument("--hub_model_id", required=True)
    parser.add_argument("--hub_token", default=None, help="Default: HF_TOKEN or the stored login.")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if not (Path(args.output_dir) / "model_index.json").is_file():
        print(f"error: {args.output_dir} holds no complete pipeline (no model_index.json).", file=sys.stderr)
        return 2
    token = resolve_token(args.hub_token)
    if not token:
        print("error: no Hub token: pass --hub_token, set HF_TOKEN or run `huggingface-cli login`.", file=sys.stderr)
        return 2
    try:
        repo_id = push_output_dir(args.output_dir, args.hub_model_id, token, args.private)
    except Exception as err:  # noqa: BLE001 - a network/auth failure is reported as one line
        print(
            f"error: upload failed ({type(err).__name__}); {args.output_dir} is unchanged, retry later.",
            file=sys.stderr,
        )
        return 1
    print(f"Uploaded {args.output_dir} to {repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
