"""Model card and Hub upload of a trained output_dir; the upload can be retried on its own:

    python -m sim_diffusers.training.hub OUTPUT_DIR --hub_model_id your-name/sim-pixart [--private]

The token comes from `--hub_token`, the HF_TOKEN environment variable or `huggingface-cli login`; it is never
printed, logged or written anywhere.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..teachers import PIXART_ALPHA, family_named

# Never uploaded: resumable training state (optimiser pickles) and temporary files of interrupted saves.
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    ".tmp-*",
    ".tmp-*/**",
    "logs/**",
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


def public_arguments(args: dict) -> dict:
    """Arguments safe to save, log and show: secrets removed."""
    return {k: v for k, v in args.items() if k not in SECRET_ARGUMENTS and not k.startswith("_")}


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
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(public_arguments(settings).items()))
    template = jinja2.Template(Path(template_path).read_text(encoding="utf-8"), keep_trailing_newline=True)
    text = template.render(
        card_data=card_data.to_yaml(),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        teacher=settings.get("pretrained_model_name_or_path"),
        teacher_family=family.name,
        conditioning_timestep=conditioning_timestep,
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
    """Create the repo if needed and upload output_dir (without checkpoints); returns the repo id."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(hub_model_id, private=private, token=token, exist_ok=True).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="Upload one-step SIM generator",
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
