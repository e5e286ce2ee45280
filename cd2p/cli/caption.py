"""``cd2p caption``: captions of point clouds from the student's semantic prefix, decoded by
ClipCap's GPT-2; with ``--pairs``, teacher and student side by side on a contact sheet."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from cd2p._atomic import atomic_write_json
from cd2p._text import styled
from cd2p.cli._common import (
    EXISTING_DIR,
    EXISTING_FILE,
    console,
    err_console,
    resolve_device,
    user_errors,
)


@click.command()
@click.argument("clouds", nargs=-1, type=EXISTING_FILE, metavar="[CLOUD]...")
@click.option(
    "--model",
    "model_id",
    required=True,
    help="A cd2p student: RUN/student of `cd2p pretrain` (or `cd2p export`), or a Hub id.",
)
@click.option(
    "--pairs",
    type=EXISTING_DIR,
    help="Prepared pairs (`cd2p prepare scannet` OUT): caption their RGB frames through the "
    "teacher and their points through the student, and write a contact sheet.",
)
@click.option(
    "--limit", default=16, show_default=True, type=click.IntRange(min=1),
    help="With --pairs: how many pairs, spread evenly over the data.",
)  # fmt: skip
@click.option(
    "--beam", type=click.IntRange(min=1), default=None,
    help="Beam search with this many beams (ClipCap's generate_beam; 5 is ClipCap's) "
    "[default: greedy, ClipCap's generate2].",
)  # fmt: skip
@click.option(
    "--gpt2",
    type=click.Path(exists=True, path_type=Path),
    help="ClipCap's GPT-2: the output of `cd2p convert clipcap` (or its gpt2/), or ClipCap's "
    "conceptual_weights.pt [default: --clipcap-weights, else the teacher's ClipCap download].",
)
@click.option(
    "--tokenizer",
    default=None,
    help="GPT-2 tokenizer: a directory with vocab.json + merges.txt, or a Hub id "
    "[default: openai-community/gpt2].",
)
@click.option(
    "--clip-weights", type=EXISTING_FILE,
    help="With --pairs: local open_clip ViT-B-32-quickgelu checkpoint for the teacher.",
)  # fmt: skip
@click.option(
    "--clipcap-weights", type=EXISTING_FILE,
    help="Local ClipCap conceptual_weights.pt (or .safetensors): the teacher's mapper, and the "
    "GPT-2 unless --gpt2 is given.",
)  # fmt: skip
@click.option(
    "--random-teacher", is_flag=True, help="With --pairs: a seeded RANDOM teacher (not CLIP)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-teacher.")
@click.option(
    "--sheet",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --pairs: the contact sheet, .html or .png [default: captions.html].",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the captions as JSON here.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
# Another registered open_clip config with ViT-B/32's interface (tests use a tiny one).
@click.option("--clip-model-name", default=None, hidden=True)
@user_errors
def caption(
    clouds: tuple[Path, ...],
    model_id: str,
    pairs: Path | None,
    limit: int,
    beam: int | None,
    gpt2: Path | None,
    tokenizer: str | None,
    clip_weights: Path | None,
    clipcap_weights: Path | None,
    random_teacher: bool,
    seed: int,
    sheet: Path | None,
    out: Path | None,
    device: str,
    clip_model_name: str | None,
) -> None:
    """Caption point clouds with a pre-trained student: its predicted semantic prefix goes
    through ClipCap's GPT-2, decoded exactly as ClipCap's predict.py (greedy, or --beam 5).

    CLOUD is a PLY (ASCII or binary), an .npy/.npz (N, 3+) array or a .txt/.xyz table (x y z
    [r g b]), in metres with z up like the ScanNet views the student was trained on; it gets
    the pre-training preprocessing (voxel grid, sampling, centring).

    \b
    Examples:
      cd2p caption --model runs/distill/student scan.ply room.npy
      cd2p caption --model runs/distill/student --pairs pairs/ --limit 12 --sheet sheet.html
      cd2p caption --model org/cd2p-student scan.ply --beam 5 --tokenizer ./gpt2-tokenizer
    """
    import cd2p
    from cd2p.data.clouds import read_cloud
    from cd2p.language.captioning import (
        Captioner,
        caption_clouds,
        caption_pairs,
        check_captioning_student,
    )
    from cd2p.language.contact_sheet import SHEET_SUFFIXES, write_contact_sheet

    if not clouds and pairs is None:
        raise click.UsageError("give CLOUD files and/or --pairs DIR")
    if pairs is None and (random_teacher or clip_weights or sheet):
        raise click.UsageError("--random-teacher, --clip-weights and --sheet go with --pairs")
    if random_teacher and (clip_weights or clipcap_weights):
        raise click.UsageError("--random-teacher takes no --clip-weights/--clipcap-weights")
    sheet = sheet or (Path("captions.html") if pairs is not None else None)
    if sheet is not None and sheet.suffix.lower() not in SHEET_SUFFIXES:
        raise click.BadParameter("the contact sheet is .html or .png", param_hint="--sheet")
    torch_device = resolve_device(device)

    student = cd2p.from_pretrained(model_id)
    check_captioning_student(student)
    student = student.to(torch_device)
    captioner = Captioner.from_pretrained(
        gpt2=gpt2 or clipcap_weights, tokenizer=tokenizer, device=torch_device
    )
    if captioner.prefix_width != student.prefix_dim:
        raise ValueError(
            f"the student predicts {student.prefix_dim}-wide prefixes but this GPT-2 is "
            f"{captioner.prefix_width} wide: use ClipCap's GPT-2 (768)"
        )
    mode = f"beam search ({beam} beams)" if beam else "greedy (top-p 0.8)"
    console.print(styled("[bold]student[/]  {model} ({objective})   [bold]decoding[/] {mode}",
                         model=model_id, objective=student.objective, mode=mode))
    console.print(styled("[bold]decoder[/]  {text}", text=captioner.description))

    records = []
    table = Table(title="captions", title_justify="left")
    table.add_column("point cloud", overflow="fold")
    table.add_column("student caption")
    if clouds:
        read = [read_cloud(path) for path in clouds]  # every file checked before any work
        texts = caption_clouds(student, captioner, [c.points for c in read], beam)
        for path, cloud, text in zip(clouds, read, texts, strict=True):
            table.add_row(f"{path} ({len(cloud)} points)", text)
            records.append({"source": str(path), "caption": text})

    entries = []
    notes = []
    if pairs is not None:
        from cd2p.data.pairs import PairDataset
        from cd2p.models.teacher import DEFAULT_MODEL_NAME, Teacher

        model_name = clip_model_name or DEFAULT_MODEL_NAME
        if random_teacher:
            teacher = Teacher.random("prefix", seed, model_name=model_name, device=torch_device)
            notes.append(
                f"RANDOM teacher (seed {seed}): its captions come from random weights, NOT CLIP."
            )
            err_console.print(styled("[bold yellow]warning:[/] {note}", note=notes[-1]))
        else:
            teacher = Teacher.from_pretrained(
                "prefix", clip_weights=clip_weights, clipcap_weights=clipcap_weights,
                device=torch_device, model_name=model_name,
            )  # fmt: skip
        dataset = PairDataset(pairs, with_image=True)
        if len(dataset) == 0:
            raise ValueError(f"{pairs} holds no pairs")
        table.add_column("teacher caption (RGB frame)")
        with console.status("captioning pairs...") as status:
            entries = caption_pairs(
                student, captioner, teacher, dataset, limit, beam,
                on_caption=lambda i, _: status.update(f"captioning pairs... {i + 1}"),
            )  # fmt: skip
        for entry in entries:
            table.add_row(entry.title, entry.student, entry.teacher)
            records.append(
                {"source": f"{pairs}: {entry.title}", "caption": entry.student,
                 "teacher_caption": entry.teacher}
            )  # fmt: skip
    console.print(table)
    if entries:
        title = f"cd2p captions: {model_id} on {pairs.name} ({mode})"
        written = write_contact_sheet(entries, sheet, title, notes)
        console.print(styled("contact sheet: [bold]{path}[/]", path=written))
    if out is not None:
        atomic_write_json(out, {"model": model_id, "decoding": mode, "captions": records})
        console.print(styled("captions: [bold]{path}[/]", path=out))
